"""The comparison API against the official PyTorch model: every stage under the fixtures' names.

`forward_stages` is the eval-mode forward, stage by stage (`case_*.npz`); `train_stages` runs the
project's own training loss and gradient (`DiscoTask.loss` under `jax.value_and_grad`, as
`training.trainer.make_train_step` does) in the set-up of `train_*.npz` and reports the results
under the official names and layouts (the inverse of `convert.variables_from_state_dict`).
`tests/test_parity.py`, `tests/test_train_parity.py` and `tools/` use them with the fixtures of
`shared/parity` (their README defines the keys and layouts).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from disco_jax.models import disco
from disco_jax.ops import colour
from disco_jax.training import losses, tasks
from disco_jax.weights import convert


def forward_stages(variables, gray, ab, anchor_mask, anchor_label,
                   model: Optional[disco.DISCO] = None, colorfulness: float = 0.5):
  """Every stage of the eval-mode forward with given anchors, keyed as the parity fixtures.

  gray `(N, H, W, 1)`, ab `(N, H, W, 2)`, anchor_mask `(N, h, w)`, anchor_label `(N, h, w)` int.
  Returns arrays with the fixture keys and layouts (see `shared/parity/README.md`), the losses
  included: plain and class-rebalanced cross-entropy of both heads against `anchor_label`.
  """
  model = model or disco.DISCO()
  gray, ab = jnp.asarray(gray, jnp.float32), jnp.asarray(ab, jnp.float32)
  anchor_label = jnp.asarray(anchor_label, jnp.int32)
  enc = model.apply(variables, gray, ab, method=disco.DISCO.encode)
  dec = model.apply(variables, gray, enc, jnp.asarray(anchor_mask), anchor_label,
                    method=disco.DISCO.decode)
  out = dict(enc, **dec)
  out['pos'] = enc['pos']
  weights = jnp.asarray(colour.class_weights(colorfulness))[anchor_label]
  for head in ('modeler', 'generator'):
    ce = losses.cross_entropy(out[f'{head}_logits'], anchor_label)
    out[f'ce_{head}'] = jnp.mean(ce)
    out[f'wce_{head}'] = jnp.mean(weights * ce)
  return out


def parity_config(dtype='float32'):
  """The fixtures' training set-up: the released model's sizes, dropout 0 (deterministic), both
  rebalanced CE heads at colorfulness 0.5 plus mean |ab_pred - ab| in place of the VGG19 term."""
  return ml_collections.ConfigDict(dict(
      model=dict(spix_width=16, backbone_width=64, refine_width=64, d_model=64, num_layers=6,
                 num_heads=8, ffn_dim=256, dropout=0.0, num_anchors=8, random_anchors=False,
                 dtype=dtype, remat=False, matmul_precision='highest'),
      loss=dict(colorfulness=0.5, perceptual_weight=0.0, vgg_weights='', ab_l1_weight=1.0)))


@functools.cache
def gradient_fn(dtype):
  """The jitted (params, model_state, batch) -> (values, grads, new model state) of the fixtures'
  set-up in `dtype`, cached: what `train_stages` runs."""
  task = tasks.DiscoTask(parity_config(dtype))

  def run(params, model_state, batch):
    # The trainer's gradient (training.trainer.make_train_step): the rng is unused with dropout 0 and given
    # anchors.
    (_, (terms, new_state, out)), grads = jax.value_and_grad(task.loss, has_aux=True)(
        params, model_state, batch, jax.random.key(0), True)
    # Plain CE values from the same logits: the official training reports these, while the
    # gradient is that of the rebalanced CE, whose value `terms` holds (training/losses.py).
    labels = batch['anchor_label']
    ce = {f'ce_{head}': jnp.mean(losses.cross_entropy(out[f'{head}_logits'], labels))
          for head in ('modeler', 'generator')}
    values = dict(ce, ab_l1=terms['ab_l1'], wce_modeler=terms['ce_modeler'],
                  wce_generator=terms['ce_generator'],
                  # What the training forward labels tokens by when no labels are given.
                  gt_label=colour.nearest_bin(jax.lax.stop_gradient(out['spix_ab'])))
    return values, grads, new_state

  return jax.jit(run)


def train_stages(variables, gray, ab, anchor_mask, anchor_label, batches_tracked: int = 0):
  """One training forward and backward of the official set-up (`shared/parity/README.md`).

  variables: Flax variables as `convert.variables_from_state_dict` makes them; their dtype is the
    compute dtype (float64 needs jax_enable_x64). gray `(N, H, W, 1)`, ab `(N, H, W, 2)`,
    anchor_mask `(N, h, w)` (the given anchors: k-means is skipped), anchor_label `(N, h, w)` int:
    the target of both CE heads at every token and the generator's hint at anchors. It is by
    construction the nearest bin of the pooled GT colour, which the training forward would compute
    itself (returned as `gt_label` to check that); it is passed in so that a bin boundary within
    float noise of a superpixel's colour cannot change the targets.
  batches_tracked: the BatchNorm counters before the forward (the fixtures' weights have 0).

  Returns a dict:
    loss, ce_modeler, ce_generator, ab_l1: the official reported values, plain CE (not rebalanced)
      of both heads plus the ab L1 term, as float;
    wce_modeler, wce_generator: the rebalanced CE values, what the trained loss sums;
    grads: {official name: gradient in torch's layout} of every trainable parameter (SPixNet is
      frozen and left out), the gradient of the rebalanced loss, as the official model's is;
    after: {official name: value after the forward} of every buffer: BatchNorm running statistics,
      spectral-norm `weight_u`/`weight_v`, and `num_batches_tracked`, which the model does not
      track: reported as `batches_tracked + 1` for every BatchNorm run in training mode (all but
      SPixNet's, which keep `batches_tracked`);
    gt_label `(N, h, w)`: nearest bin of each token's pooled GT colour.
  """
  params = variables['params']
  dtype = jnp.result_type(*jax.tree_util.tree_leaves(params)).name
  model_state = {k: variables[k] for k in tasks.DiscoTask.mutable}
  batch = dict(gray=jnp.asarray(gray, dtype), ab=jnp.asarray(ab, dtype),
               anchor_mask=jnp.asarray(anchor_mask, dtype),
               anchor_label=jnp.asarray(anchor_label, jnp.int32))
  values, grads, new_state = gradient_fn(dtype)(params, model_state, batch)
  values = {k: np.asarray(v) if k == 'gt_label' else float(v) for k, v in values.items()}
  values['loss'] = values['ce_modeler'] + values['ce_generator'] + values['ab_l1']
  trainable = {k: v for k, v in grads.items() if k not in tasks.DiscoTask.frozen}
  grad_sd = convert.state_dict_from_variables(
      {'params': trainable, 'spectral': new_state['spectral']})
  values['grads'] = {k: v for k, v in grad_sd.items() if not convert.is_buffer(k)}
  after = convert.state_dict_from_variables(new_state)
  for name in [k for k in after if k.endswith('.running_mean')]:
    module = name[:-len('.running_mean')]
    trained = not module.startswith('segnet.')
    after[f'{module}.num_batches_tracked'] = np.asarray(batches_tracked + trained, np.int64)
  values['after'] = after
  return values
