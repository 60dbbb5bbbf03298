"""LPIPS (AlexNet, v0.1) weights: torchvision's AlexNet and lpips' linear heads -> one msgpack file.

    wget https://download.pytorch.org/models/alexnet-owt-7be5be79.pth
    python -m disco_jax.weights.lpips --alexnet alexnet-owt-7be5be79.pth --out lpips.msgpack

The heads (lpips/weights/v0.1/alex.pth of the `lpips` wheel, BSD-2-Clause, 6 KB) ship in
disco_jax/assets with their licence and are the default of `--heads`. Both files are read with
`torch_file.read_state_dict` (no torch; an `.npz` of the state dict works too). `load_lpips` gives
the variables of `models.lpips.LPIPS` back.
"""
import argparse
from collections.abc import Mapping
import functools
import importlib.resources
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.models import lpips as lpips_net
from disco_jax.weights import msgpack_io, torch_file

ALEXNET_URL = 'https://download.pytorch.org/models/alexnet-owt-7be5be79.pth'
HEADS_SOURCE = 'lpips/weights/v0.1/alex.pth in the lpips wheel (pip download lpips --no-deps)'
HEADS_ASSET = 'lpips_v0.1_alex.pth'
# Index of each conv in torchvision's `alexnet().features` (ReLUs and pools sit in between).
_TORCHVISION_INDEX = {'conv1': 0, 'conv2': 3, 'conv3': 6, 'conv4': 8, 'conv5': 10}


def vendored_heads():
  """The path of the lpips v0.1 AlexNet heads shipped in disco_jax/assets."""
  return str(importlib.resources.files('disco_jax').joinpath('assets', HEADS_ASSET))


@functools.lru_cache(maxsize=1)
def _expected():
  """{path tuple: shape} of LPIPS' params, traced only (no weights made)."""
  x = jnp.zeros((1, lpips_net.MIN_SIZE, lpips_net.MIN_SIZE, 3), jnp.float32)
  params = jax.eval_shape(lambda: lpips_net.LPIPS().init(jax.random.key(0), x, x))['params']
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(params).items()}


def params_from_state_dicts(alexnet, heads):
  """torchvision `alexnet().state_dict()` and lpips' `alex.pth` (names -> arrays) -> LPIPS params.

  Kernels go OIHW -> HWIO; the heads' 1x1 conv weights `(1, C, 1, 1)` become `(C,)`. The
  classifier and any other keys are ignored. Raises a ValueError listing every missing or
  mis-shaped key of both files.
  """
  expected, params, problems = _expected(), {}, []
  for path, shape in expected.items():
    if path[0] == 'alexnet':
      conv, leaf = path[1:]
      key = f'features.{_TORCHVISION_INDEX[conv]}.{"weight" if leaf == "kernel" else "bias"}'
      torch_shape = (shape[3], shape[2], shape[0], shape[1]) if leaf == 'kernel' else shape
      value = torch_file.take_array(alexnet, key, torch_shape, problems)
      if value is not None:
        params[path] = value.transpose(2, 3, 1, 0) if leaf == 'kernel' else value
    else:
      # lpips' NetLinLayer is Sequential(Dropout, Conv2d): the conv is its module 1.
      key = f'{path[0]}.model.1.weight'
      value = torch_file.take_array(heads, key, (1, shape[0], 1, 1), problems)
      if value is not None:
        params[path] = value.reshape(shape)
  if problems:
    raise ValueError('not torchvision AlexNet weights (features.*) and lpips v0.1 AlexNet heads '
                     '(lin*.model.1.weight):\n  ' + '\n  '.join(problems))
  return flax.traverse_util.unflatten_dict(params)


def _check_params(params, where):
  """Raises a ValueError naming every missing, unexpected or mis-shaped array in `params`."""
  if not isinstance(params, Mapping):
    raise ValueError(f'{where}: expected LPIPS params (a dict), got {type(params).__name__}')
  problems = msgpack_io.shape_problems(params, _expected())
  if problems:
    raise ValueError(f'{where}: not LPIPS (AlexNet) params:\n  ' + '\n  '.join(problems))


def save_lpips(path, params):
  """Writes `{'params': params}` as msgpack, after checking every array's name and shape."""
  _check_params(params, 'save_lpips')
  msgpack_io.save(path, {'params': jax.tree.map(lambda a: np.asarray(a, np.float32), params)})


def missing_weights_message(path):
  where = f'LPIPS weights file {path!r} does not exist' if path else 'no LPIPS weights file given'
  return (
      f'{where}. LPIPS needs torchvision\'s ImageNet AlexNet and lpips\' v0.1 linear heads in our '
      f'format:\n  download {ALEXNET_URL}, then run\n'
      '      python -m disco_jax.weights.lpips --alexnet alexnet-owt-7be5be79.pth --out lpips.msgpack\n'
      f'  (read without torch; the heads, {HEADS_SOURCE}, ship with disco_jax, or name them with '
      '--heads),\nand pass --lpips lpips.msgpack.')


def load_lpips(path):
  """Reads a file written by `save_lpips` -> LPIPS variables {'params': ...} of numpy float32."""
  variables = msgpack_io.load(path, 'an LPIPS file from save_lpips', missing_weights_message(path))
  if not isinstance(variables, dict) or set(variables) != {'params'}:
    raise ValueError(f"{path}: not an LPIPS file from save_lpips (expected the one key 'params')")
  _check_params(variables['params'], path)
  return variables


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m disco_jax.weights.lpips',
      description='Convert torchvision AlexNet and lpips v0.1 heads to the file load_lpips reads.')
  parser.add_argument('--alexnet', required=True, metavar='FILE.pth|FILE.npz',
                      help=f'torchvision AlexNet, from {ALEXNET_URL}')
  parser.add_argument('--heads', default=None, metavar='FILE.pth|FILE.npz',
                      help=f'the linear heads, {HEADS_SOURCE} (default: the copy in disco_jax)')
  parser.add_argument('--out', required=True, metavar='OUT.msgpack')
  args = parser.parse_args(argv)
  try:
    params = params_from_state_dicts(torch_file.read_state_dict(args.alexnet),
                                     torch_file.read_state_dict(args.heads or vendored_heads()))
    save_lpips(args.out, params)
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
