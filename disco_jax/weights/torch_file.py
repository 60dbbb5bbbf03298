"""Reads `torch.save` files without torch, refusing anything but tensors and plain containers.

torch writes one of two layouts:

  zip (torch >= 1.6): an archive holding `<name>/data.pkl` (the pickled object), `<name>/data/<key>`
    (each storage's raw bytes), `<name>/byteorder` ('little' or 'big'; absent in early files, which
    are little-endian) and `<name>/version`.
  legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): back-to-back pickles of a magic
    number, the protocol version 1001 and system info, then the object, then the list of storage
    keys; after them, for each key in that list's order, an int64 element count and the raw bytes.

In both, a tensor is the call `torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
stride, requires_grad, backward_hooks[, metadata])`, and its storage a persistent id
`('storage', storage_type, key, location, numel[, view_metadata])` resolved by the reader.

Safety model: unpickling can call any importable function, so a checkpoint from elsewhere can run
code the moment it is read. Here `find_class` resolves names only from `_ALLOWED`, a fixed table of
our own stand-ins: rebuild functions that merely record what to read, storage types and dtypes as
inert tokens, `OrderedDict` and a few builtins for containers. Nothing is imported, so every other
global is refused before anything runs. The stand-ins also refuse pickle's BUILD opcode (which
would otherwise let a file rewrite them), and every size, stride and offset is checked against its
storage before numpy looks at the bytes.
"""
import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001  # the format's version, not pickle's


class UnsafeCheckpointError(ValueError):
  """The file asks for a Python global outside the allow-list, i.e. it may try to run code."""


class _Inert:
  """Base of every stand-in a pickle can reach: BUILD calls `__setstate__`, so cannot alter one."""

  def __setstate__(self, state):
    raise ValueError(f'the pickle tries to set the state of {type(self).__name__}')


class _Call(_Inert):
  """An allowed callable, wrapped so that BUILD cannot rewrite the function's defaults."""

  def __init__(self, fn):
    self._fn = fn

  def __call__(self, *args):
    return self._fn(*args)


class _Token(_Inert):
  """A storage type (`torch.FloatStorage`) or dtype (`torch.float32`): just names a numpy dtype."""

  def __init__(self, kind, dtype):
    self.kind, self.dtype = kind, np.dtype(dtype)


class _Storage(_Inert):
  """One storage's bytes; a legacy file fills `data` in only after the object's pickle."""

  def __init__(self, key, dtype, numel, data=None):
    self.key, self.dtype, self.numel, self.data = key, dtype, numel, data


class _Tensor(_Inert):
  """A tensor to build once its storage's bytes are known."""
  __hash__ = None  # numpy arrays are unhashable, so a placeholder must not slip into a set.

  def __init__(self, storage, offset, size, stride, dtype):
    if not isinstance(storage, _Storage):
      raise ValueError(f'tensor rebuilt from {type(storage).__name__}, not a storage')
    size, stride = tuple(size), tuple(stride)
    ints = (offset,) + size + stride
    if len(size) != len(stride) or not all(type(i) is int and i >= 0 for i in ints):
      raise ValueError(f'bad tensor layout: offset {offset!r}, size {size!r}, stride {stride!r}')
    self.storage, self.offset, self.size, self.stride, self.dtype = (
        storage, offset, size, stride, dtype)

  def to_numpy(self):
    data = self.storage.data
    if data is None:
      raise ValueError(f'no data record for storage {self.storage.key!r}')
    if len(data) % self.dtype.itemsize:
      raise ValueError(f'storage {self.storage.key!r} is not a whole number of {self.dtype}')
    buf = np.frombuffer(data, dtype=self.dtype)
    if 0 in self.size:
      return np.zeros(self.size, self.dtype)
    # as_strided trusts its arguments; a hostile layout would read memory outside the storage.
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= buf.size:
      raise ValueError(f'tensor of size {self.size}, stride {self.stride}, offset {self.offset} '
                       f'reaches past storage {self.storage.key!r} ({buf.size} elements)')
    view = np.lib.stride_tricks.as_strided(
        buf[self.offset:], self.size, [s * self.dtype.itemsize for s in self.stride],
        writeable=False)
    return np.array(view, order='C')  # contiguous, writable, and detached from the file's bytes


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  # v1 and v2; requires_grad, backward_hooks and metadata do not change the values.
  return _Tensor(storage, storage_offset, size, stride, getattr(storage, 'dtype', None))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *unused):
  # Dtypes without a typed storage (uint16, float8, ...) come as raw bytes and an explicit dtype.
  if not isinstance(dtype, _Token) or dtype.kind != 'dtype':
    raise ValueError(f'tensor dtype {dtype!r} is not a dtype')
  return _Tensor(storage, storage_offset, size, stride, dtype.dtype)


def _latin1_bytes(text, encoding='latin1'):
  # Protocol 2 pickles `bytes` as `_codecs.encode(str, 'latin1')`; nothing else is let through.
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise ValueError(f'refused _codecs.encode({type(text).__name__}, {encoding!r})')
  return text.encode('latin1')


_DTYPES = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'int64': np.int64, 'int32': np.int32, 'int16': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'uint16': np.uint16, 'uint32': np.uint32,
    'uint64': np.uint64, 'bool': np.bool_, 'complex64': np.complex64, 'complex128': np.complex128,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2,
    'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz, 'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
}
_STORAGES = {
    'DoubleStorage': 'float64', 'FloatStorage': 'float32', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
    'ComplexFloatStorage': 'complex64', 'ComplexDoubleStorage': 'complex128',
    'UntypedStorage': 'uint8',
}
_ALLOWED = {
    ('torch._utils', '_rebuild_tensor'): _Call(_rebuild_tensor),
    ('torch._utils', '_rebuild_tensor_v2'): _Call(_rebuild_tensor),
    ('torch._utils', '_rebuild_tensor_v3'): _Call(_rebuild_tensor_v3),
    # A Parameter is its data; requires_grad, hooks and Python attributes are dropped.
    ('torch._utils', '_rebuild_parameter'): _Call(lambda data, *unused: data),
    ('torch._utils', '_rebuild_parameter_with_state'): _Call(lambda data, *unused: data),
    ('torch', 'Size'): _Call(tuple),
    ('torch.storage', 'UntypedStorage'): _Token('storage', np.uint8),
    ('collections', 'OrderedDict'): _Call(collections.OrderedDict),
    ('builtins', 'set'): _Call(set),
    ('builtins', 'frozenset'): _Call(frozenset),
    ('builtins', 'complex'): _Call(complex),
    ('_codecs', 'encode'): _Call(_latin1_bytes),
    **{('torch', name): _Token('storage', _DTYPES[dtype]) for name, dtype in _STORAGES.items()},
    **{('torch', name): _Token('dtype', dtype) for name, dtype in _DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """Globals come only from `_ALLOWED`; storages from `storage_for(key, dtype, numel)`."""

  def __init__(self, file, path, storage_for=None):
    super().__init__(file)
    self._path, self._storage_for = path, storage_for

  def find_class(self, module, name):
    # Protocol 2 (torch's default) writes Python 2 names, e.g. `__builtin__.set`; map them back as
    # pickle's own find_class would, so that the table and the refusal use today's names.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[module, name]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    try:
      return _ALLOWED[module, name]
    except KeyError:
      raise UnsafeCheckpointError(
          f"{self._path}: refused to load global '{module}.{name}' (only tensors, storages and "
          'plain containers are allowed): this file may try to run code; it was not loaded'
      ) from None

  def persistent_load(self, pid):
    if (self._storage_for is None or not isinstance(pid, tuple) or len(pid) not in (5, 6)
        or pid[0] != 'storage'):
      raise ValueError(f'unexpected persistent id {pid!r:.100}')
    _, kind, key, _, numel = pid[:5]
    if len(pid) == 6 and pid[5] is not None:
      raise ValueError('storage views (torch < 0.4) are not supported')
    if (not isinstance(kind, _Token) or kind.kind != 'storage' or not isinstance(key, str)
        or type(numel) is not int or numel < 0):
      raise ValueError(f'bad storage record {pid!r:.100}')
    return self._storage_for(key, kind.dtype, numel)


def _load_zip(path):
  with zipfile.ZipFile(path) as zf:
    names = set(zf.namelist())
    pkl = sorted(n for n in names if n.count('/') == 1 and n.endswith('/data.pkl'))
    if not pkl:
      raise ValueError('a zip archive without <name>/data.pkl: not a torch.save file')
    prefix = pkl[0][:-len('data.pkl')]
    order = zf.read(prefix + 'byteorder') if prefix + 'byteorder' in names else b'little'
    if order != b'little':
      raise ValueError(f'byteorder {order!r}: only little-endian files are supported')
    storages = {}

    def storage_for(key, dtype, numel):
      if key not in storages:
        if f'{prefix}data/{key}' not in names:
          raise ValueError(f'missing storage record data/{key}')
        size = zf.getinfo(f'{prefix}data/{key}').file_size
        if size != numel * dtype.itemsize:
          raise ValueError(f'storage record data/{key} holds {size} bytes, expected {numel} x '
                           f'{dtype}')
        storages[key] = _Storage(key, dtype, numel, zf.read(f'{prefix}data/{key}'))
      return storages[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), path, storage_for).load()


def _load_legacy(path):
  storages = {}

  def storage_for(key, dtype, numel):
    return storages.setdefault(key, _Storage(key, dtype, numel))

  with open(path, 'rb') as f:
    if _Unpickler(f, path).load() != LEGACY_MAGIC:
      raise ValueError('bad magic number: not a torch.save file')
    if (protocol := _Unpickler(f, path).load()) != _LEGACY_PROTOCOL:
      raise ValueError(f'unknown legacy protocol version {protocol!r}')
    sys_info = _Unpickler(f, path).load()
    if not isinstance(sys_info, dict) or not sys_info.get('little_endian', False):
      raise ValueError('written on a big-endian machine: only little-endian files are supported')
    obj = _Unpickler(f, path, storage_for).load()
    keys = _Unpickler(f, path).load()
    if not isinstance(keys, list):
      raise ValueError('the storage key list is missing')
    for key in keys:
      if key not in storages:
        raise ValueError(f'storage {key!r} is listed but no tensor uses it')
      storage = storages[key]
      head, nbytes = f.read(8), storage.numel * storage.dtype.itemsize
      if len(head) != 8 or struct.unpack('<q', head)[0] != storage.numel:
        raise ValueError(f'storage {key!r}: truncated or wrong element count')
      # Checked first so that a made-up element count cannot make us allocate a huge buffer.
      if nbytes > os.fstat(f.fileno()).st_size - f.tell():
        raise ValueError(f'storage {key!r} is cut short (needs {nbytes} bytes)')
      storage.data = f.read(nbytes)
  return obj


def _build(obj, done):
  """Replaces every `_Tensor` in the tree with its array; shared objects stay shared."""
  if id(obj) in done:
    return done[id(obj)][1]
  done[id(obj)] = (obj, obj)  # keeps `obj` alive so that its id cannot be reused meanwhile
  if isinstance(obj, _Tensor):
    out = obj.to_numpy()
  elif isinstance(obj, dict):
    for k, v in list(obj.items()):
      obj[k] = _build(v, done)
    out = obj
  elif isinstance(obj, list):
    obj[:] = [_build(v, done) for v in obj]
    out = obj
  elif isinstance(obj, tuple):
    out = tuple(_build(v, done) for v in obj)
  else:
    return obj
  done[id(obj)] = (obj, out)
  return out


def read_torch_file(path):
  """Reads a `torch.save` file: nested dicts/lists/tuples/scalars, with numpy arrays for tensors.

  Raises UnsafeCheckpointError (a ValueError) naming the global when the file asks for anything but
  tensors, storages and plain containers, and ValueError naming the file when it is damaged or not a
  torch file. Nothing in the file is executed.
  """
  with open(path, 'rb') as f:
    head = f.read(64)
  try:
    if head.startswith(b'PK'):
      obj = _load_zip(path)
    elif LEGACY_MAGIC.to_bytes(10, 'little') in head or str(LEGACY_MAGIC).encode() in head:
      obj = _load_legacy(path)
    else:
      raise ValueError('neither a zip archive nor a legacy torch file: not a torch.save file')
    return _build(obj, {})
  except UnsafeCheckpointError:
    raise
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
  # zipfile, pickle and struct raise many unrelated exception types on damaged input.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: damaged or not a torch.save file ({type(e).__name__}: {e})') from e


def read_state_dict(path):
  """A state dict -> {name: numpy array}, from a `torch.save` file (read as `read_torch_file`
  does; a training checkpoint's 'state_dict' entry is taken) or an `.npz` of the arrays.

  Raises FileNotFoundError for a missing file, ValueError (UnsafeCheckpointError included) for a
  damaged, hostile or array-less one, naming the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  obj = read_torch_file(path)
  state = obj.get('state_dict', obj) if isinstance(obj, dict) else obj
  arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)} if isinstance(
      state, dict) else {}
  if not arrays:
    raise ValueError(f'{path}: holds no state dict of arrays (top-level keys: '
                     f'{sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})')
  return arrays


def take_array(state_dict, key, shape, problems):
  """`state_dict[key]` as float32 if it has `shape`; else None, with what is wrong added to
  `problems` (the converters list every problem of a file at once)."""
  if key not in state_dict:
    problems.append(f'missing {key} (expected shape {shape})')
    return None
  value = np.asarray(state_dict[key], np.float32)
  if value.shape != tuple(shape):
    problems.append(f'{key} has shape {value.shape}, expected {tuple(shape)}')
    return None
  return value
