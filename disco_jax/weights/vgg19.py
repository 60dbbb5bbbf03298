"""ImageNet VGG19 weights for the perceptual loss: torchvision's or Keras' file -> our msgpack file.

    python -m disco_jax.weights.vgg19 --torchvision vgg19-dcbb9e9d.pth --out vgg19.msgpack
    python -m disco_jax.weights.vgg19 --keras vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 \
        --out vgg19.msgpack

The two sources expect different input normalisations, so the file records which one its weights
need (`models.vgg.MODES`); `load_vgg19` gives both back.
"""
import argparse
from collections.abc import Mapping
import os
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.models import vgg
from disco_jax.weights import msgpack_io, torch_file

TORCHVISION_URL = 'https://download.pytorch.org/models/vgg19-dcbb9e9d.pth'
KERAS_URL = ('https://storage.googleapis.com/tensorflow/keras-applications/vgg19/'
             'vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5')
_CONV_NAMES = tuple(f'conv{b}_{i}' for b, i in vgg.BLOCK_CONVS)
_KERAS_NAME = {f'conv{b}_{i}': f'block{b}_conv{i}' for b, i in vgg.BLOCK_CONVS}
# Index of each conv in torchvision's `vgg19().features` (the ReLUs and pools sit in between).
_TORCHVISION_INDEX = dict(zip(_CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)))


def _expected_shapes():
  """{conv name: {'kernel': (3, 3, Ci, Co), 'bias': (Co,)}}, as `VGG19Features.init` makes them."""
  init = lambda: vgg.VGG19Features().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
  params = jax.eval_shape(init)['params']
  return {name: {k: tuple(v.shape) for k, v in p.items()} for name, p in params.items()}


def _check_params(params, where):
  """Raises a ValueError naming every missing, unexpected or mis-shaped array in `params`."""
  expected = _expected_shapes()
  if not isinstance(params, Mapping):
    raise ValueError(f'{where}: params must map conv names to arrays, got {type(params)}')
  problems = [f'unexpected layer {name!r}' for name in sorted(set(params) - set(expected))]
  for name, shapes in expected.items():
    layer = params.get(name)
    for k, shape in shapes.items():
      got = layer.get(k) if isinstance(layer, Mapping) else None
      if got is None:
        problems.append(f'missing {name}/{k}')
      elif tuple(np.shape(got)) != shape:
        problems.append(f'{name}/{k} has shape {tuple(np.shape(got))}, expected {shape}')
  if problems:
    raise ValueError(f'{where}: not VGG19 weights as VGG19Features expects them:\n  '
                     + '\n  '.join(problems))


def params_from_torchvision(state_dict):
  """torchvision `vgg19().state_dict()` (names -> numpy arrays) -> VGG19Features params.

  Keys past features.28 (later convs, the classifier) are ignored. Kernels go OIHW -> HWIO.
  """
  params, problems = {}, []
  for name, shapes in _expected_shapes().items():
    prefix = f'features.{_TORCHVISION_INDEX[name]}'
    h, w, ci, co = shapes['kernel']
    arrays = {}
    for k, torch_k, torch_shape in (('kernel', 'weight', (co, ci, h, w)), ('bias', 'bias', (co,))):
      value = torch_file.take_array(state_dict, f'{prefix}.{torch_k}', torch_shape, problems)
      if value is not None:
        arrays[k] = value
    if len(arrays) == 2:
      params[name] = {'kernel': arrays['kernel'].transpose(2, 3, 1, 0), 'bias': arrays['bias']}
  if problems:
    raise ValueError('not a torchvision VGG19 state dict:\n  ' + '\n  '.join(problems))
  return params


def params_from_keras_h5(path):
  """Keras' `vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5` -> VGG19Features params.

  The file holds one group per layer (block1_conv1, ...) whose `weight_names` attribute lists the
  layer's arrays as paths inside the group: 'block1_conv1/kernel:0' (a subgroup; Keras 2 and later)
  or 'block1_conv1_W_1:0' (right in the group; Keras 1). Kernels are already HWIO. Kernel and bias
  are told apart by rank, so whichever naming a file uses does not matter.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'no such Keras weights file: {path}')
  try:
    f = h5py.File(path, 'r')
  except OSError as e:
    raise ValueError(f'{path}: not a readable HDF5 file ({e})') from e
  params, problems = {}, []
  with f:
    for name, shapes in _expected_shapes().items():
      keras_name = _KERAS_NAME[name]
      group = f.get(keras_name)
      if not isinstance(group, h5py.Group):
        problems.append(f'missing layer group {keras_name}')
        continue
      names = [n.decode('utf8') if isinstance(n, bytes) else str(n)
               for n in group.attrs.get('weight_names', [])]
      arrays = [np.asarray(group[n], np.float32) for n in names if n in group]
      kernels = [a for a in arrays if a.ndim == 4]
      biases = [a for a in arrays if a.ndim == 1]
      if len(kernels) != 1 or len(biases) != 1 or len(arrays) != 2:
        problems.append(f'{keras_name}: expected one kernel and one bias listed in its '
                        f'weight_names {names}, found shapes {[a.shape for a in arrays]}')
      elif kernels[0].shape != shapes['kernel'] or biases[0].shape != shapes['bias']:
        problems.append(f'{keras_name}: kernel {kernels[0].shape} and bias {biases[0].shape}, '
                        f'expected {shapes["kernel"]} and {shapes["bias"]}')
      else:
        params[name] = {'kernel': kernels[0], 'bias': biases[0]}
  if problems:
    raise ValueError(f'{path}: not Keras VGG19 weights in the legacy HDF5 layout (layer groups '
                     'block1_conv1 ... block5_conv1):\n  ' + '\n  '.join(problems))
  return params


def save_vgg19(path, params, mode):
  """Writes `{'params': params, 'preprocess': mode}` as msgpack, after checking both."""
  vgg.check_mode(mode, 'save_vgg19')
  _check_params(params, 'save_vgg19')
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  msgpack_io.save(path, {'params': params, 'preprocess': mode})


def missing_weights_message(path):
  where = f'VGG19 weights file {path!r} does not exist' if path else 'no VGG19 weights file given'
  return (
      f'{where}. The perceptual loss needs ImageNet VGG19 weights converted to our format. Either\n'
      f'  - torchvision: download {TORCHVISION_URL}, then run\n'
      '      python -m disco_jax.weights.vgg19 --torchvision vgg19-dcbb9e9d.pth --out vgg19.msgpack\n'
      '    (read without torch), or\n'
      f'  - Keras: download {KERAS_URL}, then run\n'
      '      python -m disco_jax.weights.vgg19 --keras vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5'
      ' --out vgg19.msgpack\n'
      '    (no torch needed either),\n'
      'and point the config at vgg19.msgpack. Or set the perceptual (VGG) loss weight to 0 to '
      'train without it.')


def load_vgg19(path):
  """Reads a file written by `save_vgg19` -> (params of numpy float32 arrays, preprocess mode)."""
  state = msgpack_io.load(path, 'a VGG19 weights file from save_vgg19',
                          missing_weights_message(path))
  if not isinstance(state, dict) or set(state) != {'params', 'preprocess'}:
    raise ValueError(f'{path}: not a VGG19 weights file from save_vgg19 (expected the keys '
                     "'params' and 'preprocess')")
  vgg.check_mode(state['preprocess'], path)
  _check_params(state['params'], path)
  return state['params'], state['preprocess']


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m disco_jax.weights.vgg19',
      description='Convert ImageNet VGG19 weights to the msgpack file that load_vgg19 reads.')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--torchvision', metavar='FILE.pth', help=f'from {TORCHVISION_URL}')
  source.add_argument('--keras', metavar='FILE.h5', help=f'from {KERAS_URL}')
  parser.add_argument('--out', required=True, metavar='OUT.msgpack')
  args = parser.parse_args(argv)
  try:
    if args.torchvision:
      state_dict = torch_file.read_state_dict(args.torchvision)
      params, mode = params_from_torchvision(state_dict), 'torch'
    else:
      params, mode = params_from_keras_h5(args.keras), 'caffe'
    save_vgg19(args.out, params, mode)
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {args.out} (preprocess={mode!r})')


if __name__ == '__main__':
  main()
