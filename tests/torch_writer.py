"""Writes a state dict as `torch.save` would (zip format, pickle protocol 2), without torch.

For tests that need an official-format `.pth` of arrays they made themselves; the opcodes are the
ones torch writes for `{'state_dict': {name: tensor}}` (see `weights/torch_file.py`'s docstring).
"""
import struct
import zipfile

import numpy as np

STORAGES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.int64): 'LongStorage'}


def _text(s):
  return b'X' + struct.pack('<I', len(s.encode())) + s.encode()


def _ints(values):
  return b'(' + b''.join(b'J' + struct.pack('<i', int(v)) for v in values) + b't'


def _tensor(key, array):
  """`torch._utils._rebuild_tensor_v2(storage key, 0, shape, strides, False, OrderedDict())`."""
  storage = b'ctorch\n' + STORAGES[array.dtype].encode() + b'\n'
  pid = b'(' + _text('storage') + storage + _text(key) + _text('cpu') + _ints([array.size])[1:-1]
  pid += b'tQ'
  strides = [s // array.itemsize for s in array.strides]
  hooks = b'ccollections\nOrderedDict\n)R'
  return (b'ctorch._utils\n_rebuild_tensor_v2\n(' + pid + b'J\x00\x00\x00\x00'
          + _ints(array.shape) + _ints(strides) + b'\x89' + hooks + b'tR')


def save_state_dict(path, state_dict):
  """`path` <- {'state_dict': state_dict} ({name: float32 or int64 array}) in torch's zip format."""
  arrays = {name: np.asarray(value, order='C') for name, value in state_dict.items()}
  items = b''.join(_text(name) + _tensor(str(i), a) for i, (name, a) in enumerate(arrays.items()))
  pkl = b'\x80\x02}' + _text('state_dict') + b'}(' + items + b'us.'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pkl)
    zf.writestr('archive/byteorder', 'little')
    zf.writestr('archive/version', '3\n')
    for i, a in enumerate(arrays.values()):
      zf.writestr(f'archive/data/{i}', a.tobytes())
  return path
