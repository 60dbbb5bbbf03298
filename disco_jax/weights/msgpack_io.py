"""The one reader and writer of our weights files (msgpack of nested dicts of numpy arrays)."""
from etils import epath
import flax.serialization


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
