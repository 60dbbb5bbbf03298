"""What each training stage computes: its model, loss and pictures.

`SpixTask` is stage 1 (SPixNet alone); `DiscoTask` is stage 2 (the colorizer with
SPixNet frozen). The trainer (`training/trainer.py`) is the same for both: it only
calls `init_variables`, `loss`, `eval_terms`, `picture_arrays`, `picture_rows` and, once training
is done, `export`.
"""
import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.kernels import cpu
from disco_jax.models import disco, layers
from disco_jax.models.spixnet import SPixNet
from disco_jax.ops import colour, superpixel
from disco_jax.training import losses, sharding, writers
from disco_jax.weights import convert, vgg19

SPIXNET_EXPORT = 'spixnet.msgpack'  # what a finished stage-1 run leaves in its workdir


def _rgb(gray, ab):
  """Normalised Lab `(B, H, W, 1)`, `(B, H, W, 2)` -> sRGB `(B, H, W, 3)` in [0, 1], numpy."""
  return np.asarray(colour.lab_to_rgb(colour.denormalise_lab(jnp.asarray(gray), jnp.asarray(ab))))


class SpixTask:
  """Stage 1: SPixNet trained to reconstruct colour and position through pool + diffuse."""
  mutable = ('batch_stats',)
  frozen = ()

  def __init__(self, config, cpu_kernels: bool = False):
    # .get: runs saved before these switches existed have neither field in their config.json.
    self.model = SPixNet(config.model.spix_width, jnp.dtype(config.model.get('dtype', 'float32')),
                         cpu_kernels)
    self.loss_config = config.loss
    self.remat = config.model.get('remat', False)

  def init_variables(self, seed):
    gray = jnp.zeros((1, superpixel.STRIDE, superpixel.STRIDE, 1))
    return jax.jit(self.model.init)(jax.random.key(seed, impl='rbg'), gray)

  def _terms(self, assoc, batch):
    return {'spixel': losses.spixel_loss(assoc, batch['ab'], self.loss_config.ab_weight,
                                         self.loss_config.xy_weight)}

  def loss(self, params, model_state, batch, rng, train):
    del rng  # deterministic network
    forward = lambda p, s, gray: self.model.apply({'params': p, **s}, gray, train=train,
                                                  mutable=list(self.mutable))
    if self.remat:  # see layers.rematerialised
      forward = jax.checkpoint(forward, policy=layers.REMAT_POLICY)
    assoc, new_state = forward(params, model_state, batch['gray'])
    terms = self._terms(assoc, batch)
    return sum(terms.values()), (terms, new_state, {'assoc': assoc})

  def eval_terms(self, params, model_state, batch, rng):
    """Per-example loss terms `(B,)` in eval mode."""
    assoc = self.model.apply({'params': params, **model_state}, batch['gray'])
    per_example = jax.vmap(lambda a, ab: self._terms(a[None], {'ab': ab[None]}))
    return per_example(assoc, batch['ab'])

  def picture_arrays(self, params, model_state, batch, n):
    """Jittable: what the sample grid shows of the first n images (see `picture_rows`)."""
    gray, ab = batch['gray'][:n], batch['ab'][:n]
    assoc = self.model.apply({'params': params, **model_state}, gray)
    return {'gray': gray, 'ab': ab, 'recon': superpixel.reconstruct(ab, assoc)}

  def picture_rows(self, arrays):
    """Rows of gray | colour rebuilt from superpixel means | truth."""
    gray, ab = arrays['gray'], arrays['ab']
    return [list(r) for r in zip(_rgb(gray, 0 * ab), _rgb(gray, arrays['recon']), _rgb(gray, ab))]

  def imported_variables(self, path):
    """config.init_from's SPixNet (from a SPixelNet or a whole DISCO file) in this task's layout."""
    variables = convert.import_variables(path, disco.DISCO(spix_width=self.model.width))
    if 'segnet' not in variables.get('params', {}):
      raise ValueError(f'config.init_from={path}: holds no SPixNet (segnet) weights')
    segnet = {c: variables[c]['segnet'] for c in ('params', 'batch_stats')}
    return fitted(segnet, self.init_variables, path)

  def export(self, state, workdir, mesh):
    """Writes `workdir/spixnet.msgpack`, the frozen SPixNet that stage 2 reads."""
    variables = {'params': {'segnet': state.params},
                 'batch_stats': {'segnet': state.model_state['batch_stats']}}
    whole = sharding.gather(variables, mesh)  # every process takes part in gathering FSDP shards
    if jax.process_index() == 0:
      path = os.path.join(workdir, SPIXNET_EXPORT)
      convert.save_variables(path, whole)
      logging.info('stage 1 done: SPixNet weights for stage 2 in %s', path)


def fitted(imported, init_variables, path):
  """`imported` {collection: tree}, after checking that each of its arrays is one of
  `init_variables(seed)`'s with the same shape (a part, e.g. only SPixNet, is fine); the error
  names config.init_from and lists every misfit."""
  expected = flax.traverse_util.flatten_dict(jax.eval_shape(lambda: init_variables(0)))
  problems = []
  for key, value in flax.traverse_util.flatten_dict(imported).items():
    if key not in expected:
      problems.append(f'{"/".join(key)} is not part of this model')
    elif tuple(np.shape(value)) != expected[key].shape:
      problems.append(f'{"/".join(key)}: {tuple(np.shape(value))} in the file, '
                      f'{expected[key].shape} in the model')
  if problems:
    raise ValueError(f'config.init_from={path}: its weights do not fit config.model '
                     f'({len(problems)} problems): ' + '; '.join(problems[:20]))
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), imported)


def overlay(variables, imported):
  """`variables` with each array that `imported` holds (checked by `fitted`) replaced by it."""
  flat = flax.traverse_util.flatten_dict(variables)
  flat.update(flax.traverse_util.flatten_dict(imported))
  return flax.traverse_util.unflatten_dict(flat)


def load_spixnet_variables(path):
  """Frozen SPixNet variables from a converted `.msgpack` or a finished stage-1 workdir."""
  file = os.path.join(path, SPIXNET_EXPORT) if os.path.isdir(path) else path
  if not path or not os.path.isfile(file):
    raise FileNotFoundError(
        f'config.spixnet_checkpoint={path!r}: no SPixNet weights there. Name a finished stage-1 '
        f'run (`python train.py --config configs/spixnet.py --workdir DIR` leaves '
        f'DIR/{SPIXNET_EXPORT}) or an official SPixelNet checkpoint converted with '
        '`python -m disco_jax.weights.convert spix16ab-imagenet_last.pth.tar spixnet.msgpack --spixnet`')
  variables = convert.load_variables(file)
  return {'params': variables['params']['segnet'],
          'batch_stats': variables['batch_stats']['segnet']}


class DiscoTask:
  """Stage 2: the colorizer, losses CE_w(modeler) + CE_w(generator) + w_vgg L_vgg."""
  mutable = ('batch_stats', 'spectral')
  frozen = ('segnet',)

  def __init__(self, config, spixnet_variables=None, vgg_weights=None, cpu_kernels: bool = False,
               platform: str = 'cpu'):
    self.model = disco.from_config(config.model, cpu_kernels, platform)
    self.class_weights = jnp.asarray(colour.class_weights(config.loss.colorfulness))
    self.perceptual_weight = config.loss.perceptual_weight
    self.ab_l1_weight = config.loss.ab_l1_weight
    self.spixnet_variables = spixnet_variables
    self.vgg_params, self.vgg_mode = vgg_weights or (None, 'torch')

  def init_variables(self, seed):
    variables = disco.init_variables(self.model, seed)
    if self.spixnet_variables is None:
      return variables
    variables = jax.tree_util.tree_map(lambda x: x, variables)  # a copy we may edit
    for collection in ('params', 'batch_stats'):
      want = jax.tree_util.tree_map(jnp.shape, variables[collection]['segnet'])
      got = jax.tree_util.tree_map(jnp.shape, self.spixnet_variables[collection])
      if want != got:
        raise ValueError('the SPixNet checkpoint does not fit config.model.spix_width='
                         f'{self.model.spix_width}: its {collection} shapes differ from the model\'s')
      variables[collection]['segnet'] = jax.tree_util.tree_map(
          jnp.asarray, self.spixnet_variables[collection])
    return variables

  def imported_variables(self, path):
    """config.init_from's weights: a whole DISCO, or a SPixelNet alone (then only 'segnet')."""
    return fitted(convert.import_variables(path, self.model), self.init_variables, path)

  def loss(self, params, model_state, batch, rng, train):
    """(total, (terms, new model state, outputs)). `batch` may also give `anchor_mask` `(B, h, w)`
    and `anchor_label` `(B, h, w)` in place of the k-means anchors and GT labels (parity checks)."""
    k_drop, k_anchor = jax.random.split(rng)
    out, new_state = self.model.apply(
        {'params': params, **model_state}, batch['gray'], batch['ab'], train=train,
        anchor_mask=batch.get('anchor_mask'), anchor_label=batch.get('anchor_label'),
        rngs={'dropout': k_drop, 'anchors': k_anchor}, mutable=list(self.mutable))
    total, terms = losses.disco_loss(out, batch['gray'], batch['ab'], self.class_weights,
                                     self.vgg_params, self.vgg_mode, self.perceptual_weight,
                                     self.ab_l1_weight, self.model.dtype, self.model.remat,
                                     self.model.cpu_kernels)
    return total, (terms, new_state, out)

  def eval_terms(self, params, model_state, batch, rng):
    """Per-example loss terms `(B,)` in eval mode with GT anchors, as the official validation."""
    out = self.model.apply({'params': params, **model_state}, batch['gray'], batch['ab'],
                           rngs={'anchors': rng})

    def one(o, gray, ab):
      o = jax.tree_util.tree_map(lambda x: x[None], o)
      return losses.disco_loss(o, gray[None], ab[None], self.class_weights, self.vgg_params,
                               self.vgg_mode, self.perceptual_weight, self.ab_l1_weight,
                               self.model.dtype, self.model.remat, self.model.cpu_kernels)[1]

    keys = ('anchor_label', 'modeler_logits', 'generator_logits', 'ab_pred')
    return jax.vmap(one)({k: out[k] for k in keys}, batch['gray'], batch['ab'])

  def picture_arrays(self, params, model_state, batch, n):
    """Jittable: what the sample grid shows of the first n images (see `picture_rows`).

    Automatic: anchors by k-means on the modeler's features, coloured by its most likely bins (the
    official inference). Hinted: the training forward's anchors and ground-truth colours.
    """
    gray, ab = batch['gray'][:n], batch['ab'][:n]
    variables = {'params': params, **model_state}
    rngs = {'anchors': jax.random.key(130)}  # the official inference seed
    auto = self.model.apply(variables, gray, ab, test_mode=True, colours='mode', rngs=rngs)
    hinted = self.model.apply(variables, gray, ab, rngs=rngs)
    return {'gray': gray, 'ab': ab, 'auto': auto['ab_pred'], 'hinted': hinted['ab_pred'],
            'anchor_mask': hinted['anchor_mask']}

  def export(self, state, workdir, mesh):
    """Nothing: the checkpoints are stage 2's result (eval.py and colorize read them)."""
    del state, workdir, mesh

  def picture_rows(self, arrays):
    """Rows of gray | automatic colorization | with GT anchor colours (outlined) | truth."""
    gray, ab = arrays['gray'], arrays['ab']
    return [[g, a, writers.mark_anchors(h, m), t] for g, a, h, m, t in zip(
        _rgb(gray, 0 * ab), _rgb(gray, arrays['auto']), _rgb(gray, arrays['hinted']),
        arrays['anchor_mask'], _rgb(gray, ab))]


def uses_cpu_kernels(config, devices) -> bool:
  """`config.model.cpu_kernels` for a step compiled for `devices` (a mesh's `devices.flat`):
  'auto' means on where they are CPUs."""
  # .get: runs saved before the switch existed have no such field in their config.json.
  return cpu.wanted(config.model.get('cpu_kernels', 'auto'), devices)


def make_task(config, devices=None):
  """The task of `config.task` for a step compiled for `devices` (default: all of them, as
  train.py's mesh), with its frozen inputs (SPixNet, VGG19) loaded."""
  devices = jax.devices() if devices is None else list(devices)
  cpu_kernels = uses_cpu_kernels(config, devices)
  if config.task == 'spixnet':
    return SpixTask(config, cpu_kernels)
  vgg_weights = None
  if config.loss.perceptual_weight > 0:
    vgg_weights = vgg19.load_vgg19(config.loss.vgg_weights)
  spix = load_spixnet_variables(config.spixnet_checkpoint) if config.spixnet_checkpoint else None
  return DiscoTask(config, spix, vgg_weights, cpu_kernels, devices[0].platform)
