"""The one reader and writer of our weights files (msgpack of nested dicts of numpy arrays)."""
from etils import epath
import flax.serialization
import flax.traverse_util
import numpy as np


def save(path, tree):
  """Writes `tree` as msgpack; never leaves a half-written file under the final name.

  `path` may be a gs:// URL (epath), e.g. the stage-1 export of a training workdir in a bucket.
  """
  tmp = epath.Path(f'{path}.tmp')
  tmp.write_bytes(flax.serialization.msgpack_serialize(tree))
  tmp.replace(path)


def load(path, what: str, missing_message: str):
  """Reads a file written by `save`. A missing file raises FileNotFoundError(missing_message); a
  damaged one a ValueError naming the file and `what` it should have been."""
  if not path or not epath.Path(path).is_file():
    raise FileNotFoundError(missing_message)
  data = epath.Path(path).read_bytes()
  try:
    return flax.serialization.msgpack_restore(data)
  # msgpack raises many unrelated exception types on damaged input; all mean the same here.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: damaged or not {what} ({type(e).__name__}: {e})') from e


def shape_problems(tree, expected):
  """What is wrong with nested dict `tree` against `expected` ({path tuple: shape}): one line per
  missing, unexpected or mis-shaped array, its path joined by '/' (the converters list all)."""
  got = {k: tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}
  name = '/'.join
  problems = [f'missing {name(k)}' for k in expected if k not in got]
  problems += [f'unexpected {name(k)}' for k in got if k not in expected]
  problems += [f'{name(k)} has shape {got[k]}, expected {s}'
               for k, s in expected.items() if k in got and got[k] != s]
  return problems
