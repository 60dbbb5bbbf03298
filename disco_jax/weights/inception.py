"""pytorch-fid's InceptionV3 weights -> our msgpack file (`load_inception` reads it).

Convert once:

    python -m disco_jax.weights.inception --pytorch-fid pt_inception-2015-12-05-6726825d.pth \
        --out inception_fid.msgpack

then `variables = load_inception('inception_fid.msgpack')` for `models.inception.inception_features`.
"""
import argparse
from collections.abc import Mapping
import functools
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.models.inception import INCEPTION_SIZE, InceptionV3
from disco_jax.weights import msgpack_io, torch_file

PYTORCH_FID_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')


# Our (collection, leaf name) <-> torch parameter suffix within a BasicConv2d's 'conv'/'bn'.
_LEAF_TO_TORCH = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                  ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                  ('batch_stats', 'var'): 'running_var'}


@functools.lru_cache(maxsize=1)
def _expected():
  """{(collection, path tuple): shape} of InceptionV3's variables, traced only (no weights made)."""
  init = lambda: InceptionV3().init(
      jax.random.key(0), jnp.zeros((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))
  flat = flax.traverse_util.flatten_dict(jax.eval_shape(init))
  return {(k[0], k[1:]): tuple(v.shape) for k, v in flat.items()}


def _torch_key_and_shape(collection, path, shape):
  """Our variable -> (its torch state-dict key, its shape there; conv kernels are OIHW)."""
  key = '.'.join(path[:-1] + (_LEAF_TO_TORCH[collection, path[-1]],))
  if len(shape) == 4:
    h, w, i, o = shape
    shape = (o, i, h, w)
  return key, shape


def _ignored_torch_key(key):
  # The classifier is not part of pool3, and BN's step counter is only used in training.
  return key.startswith('fc.') or key.endswith('.num_batches_tracked')


def inception_params_from_state_dict(state_dict):
  """pytorch-fid's FIDInceptionV3 state dict (names -> arrays) -> variables for InceptionV3.

  Returns {'params': ..., 'batch_stats': ...} of numpy float32. Conv weights go OIHW -> HWIO; BN
  weight/bias/running_mean/running_var become scale/bias and batch_stats mean/var. fc.* and
  num_batches_tracked are ignored; any other unknown, missing or mis-shaped key raises a ValueError
  listing all of them.
  """
  if not isinstance(state_dict, Mapping):
    raise ValueError(f'inception_params_from_state_dict: expected a mapping of names to arrays, '
                     f'got {type(state_dict)}')
  flat, problems, known = {}, [], set()
  for (collection, path), shape in _expected().items():
    key, torch_shape = _torch_key_and_shape(collection, path, shape)
    known.add(key)
    value = torch_file.take_array(state_dict, key, torch_shape, problems)
    if value is None:
      continue
    flat[(collection,) + path] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  problems += [f'unexpected key {k}' for k in sorted(state_dict)
               if k not in known and not _ignored_torch_key(k)]
  if problems:
    raise ValueError('not a pytorch-fid InceptionV3 state dict (pt_inception-2015-12-05):\n  '
                     + '\n  '.join(problems))
  return flax.traverse_util.unflatten_dict(flat)


def _check_variables(variables, where):
  """Raises a ValueError naming every missing, unexpected or mis-shaped array in `variables`."""
  if not isinstance(variables, Mapping):
    raise ValueError(f'{where}: expected InceptionV3 variables {{"params", "batch_stats"}}, got '
                     f'{type(variables)}')
  expected = {(collection,) + path: s for (collection, path), s in _expected().items()}
  problems = msgpack_io.shape_problems(variables, expected)
  if problems:
    raise ValueError(f'{where}: not InceptionV3 FID variables:\n  ' + '\n  '.join(problems))


def save_inception(path, variables):
  """Writes InceptionV3 `variables` as msgpack, after checking every array's name and shape."""
  _check_variables(variables, 'save_inception')
  msgpack_io.save(path, jax.tree.map(lambda a: np.asarray(a, np.float32), dict(variables)))


def missing_weights_message(path):
  where = (f'InceptionV3 FID weights file {path!r} does not exist' if path
           else 'no InceptionV3 FID weights file given')
  return (
      f'{where}. FID needs the weights of pytorch-fid\'s InceptionV3 converted to our format:\n'
      f'  download {PYTORCH_FID_URL}, then run\n'
      '      python -m disco_jax.weights.inception --pytorch-fid pt_inception-2015-12-05-6726825d.pth'
      ' --out inception_fid.msgpack\n'
      '  (the .pth is read without torch),\n'
      'and point the config at inception_fid.msgpack.')


def load_inception(path):
  """Reads a file written by `save_inception` -> variables of numpy float32 arrays."""
  variables = msgpack_io.load(path, 'an InceptionV3 file from save_inception',
                              missing_weights_message(path))
  _check_variables(variables, path)
  return variables


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m disco_jax.weights.inception',
      description='Convert pytorch-fid InceptionV3 weights to the msgpack file load_inception reads.')
  parser.add_argument('--pytorch-fid', required=True, metavar='FILE.pth|FILE.npz',
                      help=f'from {PYTORCH_FID_URL}, or its state dict saved as .npz')
  parser.add_argument('--out', required=True, metavar='OUT.msgpack')
  args = parser.parse_args(argv)
  try:
    variables = inception_params_from_state_dict(torch_file.read_state_dict(args.pytorch_fid))
    save_inception(args.out, variables)
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
