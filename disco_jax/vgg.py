"""Frozen ImageNet VGG19 for DISCO's perceptual loss, its weights, and the loss itself.

DISCO trains the RefineNet with
    L_vgg = sum_l c_l * mean|phi_l(pred) - stop_gradient(phi_l(gt))|,
phi_l = relu1_1, relu2_1, relu3_1, relu4_1, relu5_1, c = (1/32, 1/16, 1/8, 1/4, 1).

The weights come from torchvision (`vgg19-dcbb9e9d.pth`) or from Keras (ported from Caffe); the two
expect different input normalisations, so our weights file records which one its weights need.
Convert once with

    python -m disco_jax.vgg --torchvision vgg19-dcbb9e9d.pth --out vgg19.msgpack
    python -m disco_jax.vgg --keras vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 \
        --out vgg19.msgpack

then `params, mode = load_vgg19('vgg19.msgpack')` and `perceptual_loss(params, mode, pred, gt)`.
"""
import argparse
from collections.abc import Mapping
import os
import sys
from typing import Any

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np

from disco_jax import layers, msgpack_io

LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # c_l for relu1_1 ... relu5_1

# (output channels, number of 3x3 convs) per block. Only conv5_1 of block 5 is needed: relu5_1 is
# the deepest feature the loss uses.
_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 1))
_BLOCK_CONV = tuple((b, i) for b, (_, n) in enumerate(_BLOCKS, 1) for i in range(1, n + 1))
_CONV_NAMES = tuple(f'conv{b}_{i}' for b, i in _BLOCK_CONV)
_KERAS_NAME = {f'conv{b}_{i}': f'block{b}_conv{i}' for b, i in _BLOCK_CONV}
# Index of each conv in torchvision's `vgg19().features` (the ReLUs and pools sit in between).
_TORCHVISION_INDEX = dict(zip(_CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)))

_TORCH_MEAN = (0.485, 0.456, 0.406)  # RGB, for inputs in [0, 1]
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # for BGR inputs in [0, 255]
MODES = ('torch', 'caffe')

TORCHVISION_URL = 'https://download.pytorch.org/models/vgg19-dcbb9e9d.pth'
KERAS_URL = ('https://storage.googleapis.com/tensorflow/keras-applications/vgg19/'
             'vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5')


class VGG19Features(nn.Module):
  """VGG19 (no BN) up to relu5_1. Input `(B, H, W, 3)` already `preprocess`ed.

  Returns (relu1_1, relu2_1, relu3_1, relu4_1, relu5_1), shapes `(B, H / 2**k, W / 2**k, C_k)` with
  C = 64, 128, 256, 512, 512 (pools floor odd sizes, as torch's MaxPool2d(2, 2) does).
  """
  dtype: Any = jnp.float32  # of the convolutions

  @nn.compact
  def __call__(self, x):
    features = []
    for b, (channels, n) in enumerate(_BLOCKS, 1):
      if b > 1:
        x = layers.max_pool_2x2(x)
      for i in range(1, n + 1):
        x = layers.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            name=f'conv{b}_{i}')(x))
        if i == 1:
          features.append(x)
      x = layers.block_output(x)
    return tuple(features)


def preprocess(rgb, mode):
  """RGB `(..., 3)` nominally in [0, 1] -> the float32 input that `mode`'s weights were trained on.

  'torch': ImageNet mean/std on RGB in [0, 1]. 'caffe' (Keras' weights): BGR in [0, 255] minus the
  BGR pixel mean, no scaling.
  """
  _check_mode(mode, 'preprocess')
  rgb = jnp.asarray(rgb, jnp.float32)
  if mode == 'torch':
    return (rgb - jnp.array(_TORCH_MEAN)) / jnp.array(_TORCH_STD)
  return rgb[..., ::-1] * 255.0 - jnp.array(_CAFFE_MEAN_BGR)


def _check_mode(mode, where):
  if mode not in MODES:
    raise ValueError(f'{where}: unknown VGG19 preprocessing mode {mode!r}; expected one of {MODES}')


def perceptual_loss(params, mode, rgb_pred, rgb_gt, dtype=jnp.float32, remat=False):
  """L_vgg between RGB batches `(B, H, W, 3)`; a float32 scalar. `mode` is static under jit.

  The convolutions run in `dtype` (bfloat16 for mixed precision), the distances in float32;
  `remat` keeps only block outputs of the prediction's forward for the backward pass.

  Only the prediction gets a gradient: the ground-truth features are detached. This is DISCO's
  behaviour before 2024; the official repository at HEAD detaches the prediction's features instead
  (commit 3c48626), which leaves the RefineNet with no gradient at all, so we do not follow it.
  """
  # The VGG is frozen: no gradient reaches its weights even if a caller differentiates them.
  vgg19 = layers.rematerialised(VGG19Features, remat)(dtype)
  net = lambda x: vgg19.apply({'params': jax.lax.stop_gradient(params)}, x)
  # Two forwards, not one over the concatenated batch: through a concatenation the backward pass
  # would run the whole VGG over the ground-truth half too, only to produce zeros.
  pred = net(preprocess(rgb_pred, mode))
  truth = net(jax.lax.stop_gradient(preprocess(rgb_gt, mode)))
  loss = jnp.zeros((), jnp.float32)
  for weight, fp, ft in zip(LAYER_WEIGHTS, pred, truth):
    loss += weight * jnp.mean(jnp.abs(fp.astype(jnp.float32)
                                      - jax.lax.stop_gradient(ft).astype(jnp.float32)))
  return loss


def _expected_shapes():
  """{conv name: {'kernel': (3, 3, Ci, Co), 'bias': (Co,)}}, as `VGG19Features.init` makes them."""
  init = lambda: VGG19Features().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
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
      key = f'{prefix}.{torch_k}'
      if key not in state_dict:
        problems.append(f'missing {key} (expected shape {torch_shape})')
        continue
      value = np.asarray(state_dict[key], np.float32)
      if value.shape != torch_shape:
        problems.append(f'{key} has shape {value.shape}, expected {torch_shape}')
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
  _check_mode(mode, 'save_vgg19')
  _check_params(params, 'save_vgg19')
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  msgpack_io.save(path, {'params': params, 'preprocess': mode})


def missing_weights_message(path):
  where = f'VGG19 weights file {path!r} does not exist' if path else 'no VGG19 weights file given'
  return (
      f'{where}. The perceptual loss needs ImageNet VGG19 weights converted to our format. Either\n'
      f'  - torchvision: download {TORCHVISION_URL}, then run\n'
      '      python -m disco_jax.vgg --torchvision vgg19-dcbb9e9d.pth --out vgg19.msgpack\n'
      '    (this needs torch installed: pip install torch), or\n'
      f'  - Keras: download {KERAS_URL}, then run\n'
      '      python -m disco_jax.vgg --keras vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5'
      ' --out vgg19.msgpack\n'
      '    (no torch needed),\n'
      'and point the config at vgg19.msgpack. Or set the perceptual (VGG) loss weight to 0 to '
      'train without it.')


def load_vgg19(path):
  """Reads a file written by `save_vgg19` -> (params of numpy float32 arrays, preprocess mode)."""
  state = msgpack_io.load(path, 'a VGG19 weights file from save_vgg19',
                          missing_weights_message(path))
  if not isinstance(state, dict) or set(state) != {'params', 'preprocess'}:
    raise ValueError(f'{path}: not a VGG19 weights file from save_vgg19 (expected the keys '
                     "'params' and 'preprocess')")
  _check_mode(state['preprocess'], path)
  _check_params(state['params'], path)
  return state['params'], state['preprocess']


def _load_torchvision_state_dict(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel  # only this converter needs torch
  except ImportError:
    sys.exit('error: reading a .pth file needs torch, which is not installed: pip install torch, '
             f'or convert the Keras weights instead (no torch needed): {KERAS_URL} with --keras')
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.numpy() for k, v in state_dict.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m disco_jax.vgg',
      description='Convert ImageNet VGG19 weights to the msgpack file that load_vgg19 reads.')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--torchvision', metavar='FILE.pth', help=f'from {TORCHVISION_URL}')
  source.add_argument('--keras', metavar='FILE.h5', help=f'from {KERAS_URL}')
  parser.add_argument('--out', required=True, metavar='OUT.msgpack')
  args = parser.parse_args(argv)
  try:
    if args.torchvision:
      state_dict = _load_torchvision_state_dict(args.torchvision)
      params, mode = params_from_torchvision(state_dict), 'torch'
    else:
      params, mode = params_from_keras_h5(args.keras), 'caffe'
    save_vgg19(args.out, params, mode)
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {args.out} (preprocess={mode!r})')


if __name__ == '__main__':
  main()
