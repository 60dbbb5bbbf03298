"""Import official DISCO checkpoints: a PyTorch state dict -> Flax variables.

The core, `variables_from_state_dict`, takes a mapping of names to numpy arrays and needs no torch.
Flax module names follow the torch module paths with each numeric index merged into the name before
it (`repnet.conv2_3.4` -> `repnet/conv2_3_4`, `wildpath.layers.0` -> `wildpath/layers_0`), so the
mapping is a fixed rule on names plus a layout change per kind of tensor:

  Conv2d weight (O, I, kh, kw)        -> kernel (kh, kw, I, O)
  ConvTranspose2d weight (I, O, 4, 4) -> kernel (4, 4, I, O)   (see layers.ConvTranspose)
  spectral norm weight_orig/u/v       -> kernel, and 'spectral' u (O,), v (kh*kw*I,)
  Linear weight (O, I)                -> kernel (I, O); MHA in_proj_weight (3d, d) -> (d, 3d)
  BatchNorm weight/bias/running_*     -> scale/bias and 'batch_stats' mean/var
  LayerNorm weight/bias               -> scale/bias

Command line (the `.pth.tar` is read without torch, by `weights.torch_file`; an `.npz` of the
arrays works too):
  python -m disco_jax.weights.convert disco-beta.pth.tar disco-beta.msgpack
  python -m disco_jax.weights.convert spix16ab-imagenet_last.pth.tar spixnet.msgpack --spixnet
"""
import argparse
import os
import re
import sys
from typing import Mapping, Optional

import flax
import jax
import numpy as np

from disco_jax.models import disco
from disco_jax.weights import msgpack_io, torch_file

_IGNORED_LEAVES = ('num_batches_tracked',)  # BatchNorm's counter: unused with a fixed momentum


def _flax_module_path(torch_module: str):
  """'enhanceNet.residual.0.conv.1' -> ('enhanceNet', 'residual_0', 'conv_1')."""
  tokens = []
  for token in torch_module.split('.'):
    if token.isdigit() and tokens:
      tokens[-1] = f'{tokens[-1]}_{token}'
    else:
      tokens.append(token)
  return tuple(tokens)


def _map_entry(name, value):
  """One state-dict entry -> (collection, flax path, array), or None for ignored entries."""
  module, leaf = name.rsplit('.', 1)
  path = _flax_module_path(module)
  value = np.asarray(value)
  if leaf in _IGNORED_LEAVES:
    return None
  if leaf in ('weight', 'weight_orig') and value.ndim == 4:
    if re.fullmatch(r'deconv\d+_0', path[-1]):
      return 'params', path + ('kernel',), value.transpose(2, 3, 0, 1)
    return 'params', path + ('kernel',), value.transpose(2, 3, 1, 0)
  if leaf == 'weight_u':
    return 'spectral', path + ('u',), value
  if leaf == 'weight_v':
    # torch flattens the kernel as (I, kh, kw); our matrix view flattens (kh, kw, I).
    orig = value.reshape(-1, 3, 3)
    return 'spectral', path + ('v',), orig.transpose(1, 2, 0).reshape(-1)
  if leaf == 'weight' and value.ndim == 2:
    return 'params', path + ('kernel',), value.T
  if leaf == 'in_proj_weight':
    return 'params', path + ('in_proj_kernel',), value.T
  if leaf == 'in_proj_bias':
    return 'params', path + ('in_proj_bias',), value
  if leaf == 'weight' and value.ndim == 1:  # BatchNorm or LayerNorm scale
    return 'params', path + ('scale',), value
  if leaf == 'bias':
    return 'params', path + ('bias',), value
  if leaf == 'running_mean':
    return 'batch_stats', path + ('mean',), value
  if leaf == 'running_var':
    return 'batch_stats', path + ('var',), value
  return 'unknown', path + (leaf,), value


def _torch_module_name(path):
  """Inverse of `_flax_module_path`: ('enhanceNet', 'residual_0', 'conv_1') ->
  'enhanceNet.residual.0.conv.1'. A token's trailing `_<digits>` is the index merged into it (at
  most one per token in this model, checked on every official key by tests/test_train_parity.py);
  names that end in digits themselves keep them (`conv1_2_0` -> `conv1_2.0`).
  """
  tokens = []
  for token in path:
    match = re.fullmatch(r'(.+)_(\d+)', token)
    tokens.extend(match.groups() if match else (token,))
  return '.'.join(tokens)


_BUFFER_LEAVES = ('running_mean', 'running_var', 'weight_u', 'weight_v')  # not parameters


def state_dict_from_variables(variables):
  """Flax variables -> official state dict {name: numpy array in torch's layout}: the inverse of
  `variables_from_state_dict` (without `num_batches_tracked`, which the model does not track).

  `variables` may hold any of 'params', 'batch_stats', 'spectral', or a tree of the same structure
  in their place (gradients as 'params'). A 4-D kernel is a spectral-norm `weight_orig` exactly
  where 'spectral' holds the module's u, so pass 'spectral' with gradients of such kernels.
  """
  flat = flax.traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(variables)))
  spectral = {k[1:-1] for k in flat if k[0] == 'spectral'}
  out = {}
  for (collection, *path, leaf), value in flat.items():
    path = tuple(path)
    if collection == 'spectral':
      leaf = {'u': 'weight_u', 'v': 'weight_v'}[leaf]
      if leaf == 'weight_v':  # ours flattens the kernel as (kh, kw, I), torch as (I, kh, kw)
        value = value.reshape(3, 3, -1).transpose(2, 0, 1).reshape(-1)
    elif collection == 'batch_stats':
      leaf = {'mean': 'running_mean', 'var': 'running_var'}[leaf]
    elif collection != 'params':
      raise ValueError(f'unknown variable collection {collection!r}')
    elif leaf == 'kernel' and value.ndim == 4:
      if re.fullmatch(r'deconv\d+_0', path[-1]):
        leaf, value = 'weight', value.transpose(2, 3, 0, 1)
      else:
        leaf, value = ('weight_orig' if path in spectral else 'weight'), value.transpose(3, 2, 0, 1)
    elif leaf in ('kernel', 'in_proj_kernel'):
      leaf, value = leaf.replace('kernel', 'weight'), value.T
    elif leaf == 'scale':
      leaf = 'weight'
    elif leaf not in ('bias', 'in_proj_bias'):
      raise ValueError(f'no official name for {collection}/{"/".join(path)}/{leaf}')
    name = f'{_torch_module_name(path)}.{leaf}'
    out['segnet.net.' + name[len('segnet.'):] if name.startswith('segnet.') else name] = value
  return out


def is_buffer(name):
  """Whether an official state-dict name is a buffer (BatchNorm statistics, spectral-norm u/v)."""
  return name.rsplit('.', 1)[-1] in _BUFFER_LEAVES + _IGNORED_LEAVES


def _strip_prefixes(state_dict, spixnet_only):
  out = {}
  for name, value in state_dict.items():
    name = name[len('module.'):] if name.startswith('module.') else name  # DDP-saved files
    if spixnet_only:
      # Stage-1 checkpoints hold the SPixelNet wrapper's `net.*` keys.
      name = 'segnet.' + name[len('net.'):] if name.startswith('net.') else name
    else:
      name = 'segnet.' + name[len('segnet.net.'):] if name.startswith('segnet.net.') else name
    out[name] = value
  return out


def expected_variables(model: Optional[disco.DISCO] = None):
  """Shapes of every variable of `model` (released sizes by default), without computing them."""
  model = model or disco.DISCO()
  shapes = jax.eval_shape(lambda: disco.init_variables(model))
  return flax.traverse_util.flatten_dict(shapes)


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray],
                              model: Optional[disco.DISCO] = None,
                              spixnet_only: bool = False):
  """Official state dict {name: array} -> Flax variables {'params', 'batch_stats', 'spectral'}.

  With `spixnet_only`, the dict is a stage-1 SPixelNet checkpoint and only `segnet` is returned.
  Unknown, missing or mis-shaped entries raise a ValueError that lists all of them.
  """
  expected = expected_variables(model)
  if spixnet_only:
    expected = {k: v for k, v in expected.items() if k[1] == 'segnet'}
  flat, source, unknown = {}, {}, []
  for name, value in _strip_prefixes(state_dict, spixnet_only).items():
    mapped = _map_entry(name, value)
    if mapped is None:
      continue
    collection, path, array = mapped
    key = (collection,) + path
    if key not in expected:
      unknown.append(name)
      continue
    flat[key], source[key] = array.astype(np.float32), name
  problems = []
  if unknown:
    problems.append('unknown keys (not part of this model): ' + ', '.join(sorted(unknown)))
  missing = sorted('/'.join(k) for k in expected if k not in flat)
  if missing:
    problems.append('missing entries (expected by the model, absent from the checkpoint): '
                    + ', '.join(missing))
  shaped = [f'{source[k]}: checkpoint {flat[k].shape} vs model {tuple(expected[k].shape)}'
            for k in flat if flat[k].shape != tuple(expected[k].shape)]
  if shaped:
    problems.append('mis-shaped entries (after layout conversion): ' + '; '.join(shaped))
  if problems:
    raise ValueError('cannot convert this state dict:\n  ' + '\n  '.join(problems))
  return flax.traverse_util.unflatten_dict(flat)


def save_variables(path, variables):
  """Write variables as msgpack (readable with `load_variables`, no model needed)."""
  msgpack_io.save(path, jax.tree_util.tree_map(np.asarray, variables))


def load_variables(path):
  """Read variables written by `save_variables`."""
  return msgpack_io.load(
      path, 'a variables file from python -m disco_jax.weights.convert',
      f'{path}: no such variables file. Convert an official checkpoint with '
      f'`python -m disco_jax.weights.convert CHECKPOINT.pth.tar {path}`')


def is_spixnet_state_dict(state_dict) -> bool:
  """Whether an official state dict is a stage-1 SPixelNet checkpoint: its keys are `net.*`
  (`module.net.*` when saved under DDP), where DISCO's are `segnet.*`, `repnet.*`, ..."""
  return any(k.removeprefix('module.').startswith('net.') for k in state_dict)


def import_variables(path, model: Optional[disco.DISCO] = None):
  """Variables from any weights file, checked against `model` (released sizes by default).

  `path`: a `.msgpack` written by `save_variables` (returned as stored), or an official DISCO or
  SPixelNet `.pth`/`.pth.tar` (read without torch, refusing code) or an `.npz` of its arrays. A
  SPixelNet file gives the 'segnet' entries only. Raises FileNotFoundError or ValueError naming
  the file.
  """
  path = os.fspath(path)
  if path.endswith('.msgpack'):
    return load_variables(path)
  state_dict = torch_file.read_state_dict(path)
  try:
    return variables_from_state_dict(state_dict, model, is_spixnet_state_dict(state_dict))
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('checkpoint', help='official .pth/.pth.tar (read without torch) or .npz of '
                      'arrays')
  parser.add_argument('out', help='output variables file (.msgpack)')
  parser.add_argument('--spixnet', action='store_true',
                      help='the file is a stage-1 SPixelNet checkpoint (keys net.*)')
  args = parser.parse_args(argv)
  try:
    variables = variables_from_state_dict(torch_file.read_state_dict(args.checkpoint),
                                          spixnet_only=args.spixnet)
  except (OSError, ValueError) as e:
    sys.exit(f'error: {e}')
  save_variables(args.out, variables)
  n = disco.count_params(variables['params'])
  print(f'wrote {args.out}: {n:,} parameters')


if __name__ == '__main__':
  main()
