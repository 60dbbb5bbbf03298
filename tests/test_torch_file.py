"""`torch_file.read_torch_file`: real `torch.save` files read without torch; hostile ones refused.

The real files are in `$DISCO_PARITY_DIR/torch/` (see its README); tests that need them skip when
the folder is absent. Hostile and damaged files are written here with the stdlib pickle module.
Every comparison is exact (same dtype, same shape, same bytes): this is a byte-level reader.
"""
import collections
import importlib.util
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from disco_jax.weights import torch_file
from disco_jax.weights.torch_file import UnsafeCheckpointError, read_torch_file

REPO = pathlib.Path(__file__).resolve().parent.parent
PARITY = pathlib.Path(os.environ.get('DISCO_PARITY_DIR', REPO.parent / 'shared' / 'parity'))
MARKER = 'disco_checkpoint_executed_code'


@pytest.fixture(scope='module')
def torch_dir():
  path = PARITY / 'torch'
  if not (path / 'README.md').exists():
    pytest.skip(f'torch.save fixtures not found at {path} (set DISCO_PARITY_DIR to the parity '
                'folder holding torch/, make_state_dict.py and official_keys.tsv)')
  return path


@pytest.fixture(scope='module')
def segnet_seed3(torch_dir):
  """The `segnet.*` entries of make_state_dict(seed=3), prefix removed: what spixnet_seed3 holds."""
  spec = importlib.util.spec_from_file_location('make_state_dict', PARITY / 'make_state_dict.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  full = module.make_state_dict(PARITY / 'official_keys.tsv', seed=3)
  return {k[len('segnet.'):]: v for k, v in full.items() if k.startswith('segnet.')}


def _assert_same(actual, expected, name):
  assert isinstance(actual, np.ndarray), name
  assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
  np.testing.assert_array_equal(actual, expected, err_msg=name)


@pytest.mark.parametrize('filename, prefix', [('spixnet_seed3.pth.tar', ''),
                                              ('spixnet_seed3_ddp_legacy.pth.tar', 'module.')])
def test_spixnet_checkpoint(torch_dir, segnet_seed3, filename, prefix):
  ckpt = read_torch_file(torch_dir / filename)
  assert ckpt['epoch'] == 199 and ckpt['best_loss'] == 0.0625
  state = ckpt['state_dict']
  assert sorted(state) == sorted(prefix + k for k in segnet_seed3)
  for name, expected in segnet_seed3.items():
    _assert_same(state[prefix + name], expected, name)


def test_tiny_full_checkpoint(torch_dir):
  ckpt = read_torch_file(torch_dir / 'tiny_full.pth.tar')
  with np.load(torch_dir / 'tiny_full_expected.npz') as npz:
    expected = dict(npz)
  seen = {'state_dict': set(ckpt['state_dict']), 'extra': set(ckpt['extra']),
          'optimizer': {f'state/{i}/{k}' for i, s in ckpt['optimizer']['state'].items() for k in s}}
  assert {(k.split('/', 1)[0], k.split('/', 1)[1]) for k in expected} == {
      (group, name) for group, names in seen.items() for name in names}
  for key, want in expected.items():
    node = ckpt
    for part in key.split('/'):
      node = node[int(part)] if part.isdigit() and int(part) in node else node[part]  # state's ids
    _assert_same(node, want, key)
  extra = ckpt['extra']
  assert extra['transposed'].flags.c_contiguous  # the transposed storage was re-laid out
  assert extra['half'].dtype == np.float16 and extra['int64'].dtype == np.int64
  assert extra['scalar'].ndim == 0
  groups = ckpt['optimizer']['param_groups']
  assert isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
  assert groups[0]['lr'] == 0.0002 and groups[0]['betas'] == (0.9, 0.999)
  assert groups[0]['params'] == [0, 1, 2, 3, 4, 5]
  plain = (int, float, bool, str, type(None), tuple, list)
  assert all(isinstance(v, plain) for v in groups[0].values())
  assert ckpt['epoch'] == 5 and ckpt['best_loss'] == 1.5


def test_malicious_fixture_refused(torch_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UnsafeCheckpointError, match=r"refused to load global 'posix\.system'") as e:
    read_torch_file(torch_dir / 'malicious.pth.tar')
  assert 'malicious.pth.tar' in str(e.value)
  assert not (tmp_path / MARKER).exists() and not (REPO / MARKER).exists()


# Without the allow-list (torch's names resolved to dummies, the rest trusted, as a plain
# `torch.load(weights_only=False)` would), the fixture does run its payload.
_TRUSTING_READER = """
import pickle, sys, zipfile
class Trusting(pickle.Unpickler):
  def find_class(self, module, name):
    return (lambda *a: None) if module.startswith('torch') else super().find_class(module, name)
  def persistent_load(self, pid):
    return None
with zipfile.ZipFile(sys.argv[1]) as zf:
  Trusting(zf.open([n for n in zf.namelist() if n.endswith('/data.pkl')][0])).load()
"""


def test_malicious_fixture_is_really_hostile(torch_dir, tmp_path):
  subprocess.run([sys.executable, '-c', _TRUSTING_READER, str(torch_dir / 'malicious.pth.tar')],
                 cwd=tmp_path, check=True, timeout=60)
  assert (tmp_path / MARKER).exists()


# Hand-written pickles, opcode by opcode, the way torch.save lays out a tensor (no torch needed).
def _str(s):
  return b'X' + struct.pack('<I', len(s.encode())) + s.encode()


def _int(n):
  return b'J' + struct.pack('<i', n)


def _tuple(items):
  return b'(' + b''.join(items) + b't'


def _global(module, name):
  return b'c' + f'{module}\n{name}\n'.encode()


def _tensor_pickle(numel, offset, size, stride, storage='FloatStorage', legacy=False, v3=None):
  """{'t': tensor over storage '0'} as torch.save pickles it (protocol 2); `v3`: a dtype name."""
  pid = [_str('storage'), _global('torch', storage), _str('0'), _str('cpu'), _int(numel)]
  pid = _tuple(pid + [b'N'] if legacy else pid) + b'Q'
  hooks = _global('collections', 'OrderedDict') + b')R'
  args = [pid, _int(offset), _tuple(map(_int, size)), _tuple(map(_int, stride)), b'\x89', hooks]
  fn = '_rebuild_tensor_v3' if v3 else '_rebuild_tensor_v2'
  args = _tuple(args + [_global('torch', v3)] if v3 else args)
  return b'\x80\x02}' + _str('t') + _global('torch._utils', fn) + args + b'Rs.'


def _write_zip(path, pkl, storages=(), byteorder=b'little'):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pkl)
    zf.writestr('archive/byteorder', byteorder)
    zf.writestr('archive/version', '3\n')
    for key, data in dict(storages).items():
      zf.writestr(f'archive/data/{key}', data)
  return path


def _write_legacy(path, pkl, storages=(), little_endian=True):
  storages = dict(storages)
  info = {'protocol_version': 1001, 'little_endian': little_endian,
          'type_sizes': {'short': 2, 'int': 4, 'long': 8}}
  parts = [pickle.dumps(x, protocol=2) for x in (torch_file.LEGACY_MAGIC, 1001, info)]
  parts += [pkl, pickle.dumps(list(storages), protocol=2)]
  parts += [struct.pack('<q', len(d) // 4) + d for d in storages.values()]
  path.write_bytes(b''.join(parts))
  return path


STORAGE = np.arange(12, dtype=np.float32)


@pytest.mark.parametrize('legacy', [False, True])
def test_hand_made_strided_tensor(tmp_path, legacy):
  pkl = _tensor_pickle(12, 1, (3, 2), (1, 4), legacy=legacy)
  write = _write_legacy if legacy else _write_zip
  t = read_torch_file(write(tmp_path / 'f.pth', pkl, {'0': STORAGE.tobytes()}))['t']
  _assert_same(t, np.array([[1, 5], [2, 6], [3, 7]], np.float32), 't')


@pytest.mark.parametrize('storage, dtype', [
    ('BFloat16Storage', ml_dtypes.bfloat16), ('HalfStorage', np.float16),
    ('DoubleStorage', np.float64), ('LongStorage', np.int64), ('ByteStorage', np.uint8),
    ('BoolStorage', np.bool_)])
def test_storage_dtypes(tmp_path, storage, dtype):
  values = np.array([[1.5, -2], [0, 3]]).astype(dtype)
  path = _write_zip(tmp_path / 'f.pth', _tensor_pickle(4, 0, (2, 2), (2, 1), storage),
                    {'0': values.tobytes()})
  _assert_same(read_torch_file(path)['t'], values, storage)


def test_rebuild_tensor_v3(tmp_path):
  # Newer dtypes come as an untyped (byte) storage plus an explicit dtype; offset is in elements.
  values = np.array([7, 65535, 1, 2], np.uint16)
  path = _write_zip(tmp_path / 'f.pth', _tensor_pickle(8, 1, (3,), (1,), 'UntypedStorage',
                                                       v3='uint16'), {'0': values.tobytes()})
  _assert_same(read_torch_file(path)['t'], values[1:], 'v3')


def test_plain_containers(tmp_path):
  # Protocol 2, torch's default, names these with Python 2 globals (`__builtin__.set`, ...).
  obj = {'set': {1, 2}, 'frozen': frozenset([3]), 'bytes': b'\x00\xff', 'complex': 1 + 2j,
         'ordered': collections.OrderedDict(a=[1, (2.5, None, True)]), 'text': 'é'}
  path = _write_zip(tmp_path / 'plain.pth', pickle.dumps(obj, protocol=2))
  assert read_torch_file(path) == obj


@pytest.mark.parametrize('legacy', [False, True])
def test_out_of_bounds_layout_refused(tmp_path, legacy):
  write = _write_legacy if legacy else _write_zip
  path = write(tmp_path / 'f.pth', _tensor_pickle(12, 2, (3, 4), (4, 1), legacy=legacy),
               {'0': STORAGE.tobytes()})
  with pytest.raises(ValueError, match='reaches past storage'):
    read_torch_file(path)


def test_missing_storage_record(tmp_path):
  path = _write_zip(tmp_path / 'f.pth', _tensor_pickle(12, 0, (12,), (1,)))
  with pytest.raises(ValueError, match=r'f\.pth: missing storage record data/0'):
    read_torch_file(path)


def test_legacy_missing_storage_bytes(tmp_path):
  path = _write_legacy(tmp_path / 'f.pth', _tensor_pickle(12, 0, (12,), (1,), legacy=True))
  with pytest.raises(ValueError, match="f\\.pth: no data record for storage '0'"):
    read_torch_file(path)


def test_big_endian_refused(tmp_path):
  zip_path = _write_zip(tmp_path / 'z.pth', _tensor_pickle(12, 0, (12,), (1,)),
                        {'0': STORAGE.byteswap().tobytes()}, byteorder=b'big')
  with pytest.raises(ValueError, match='only little-endian'):
    read_torch_file(zip_path)
  legacy_path = _write_legacy(tmp_path / 'l.pth', _tensor_pickle(12, 0, (12,), (1,), legacy=True),
                              {'0': STORAGE.tobytes()}, little_endian=False)
  with pytest.raises(ValueError, match='only little-endian'):
    read_torch_file(legacy_path)


class _Payload:
  """Pickles as a call of `fn(*args)`, as an attacker's checkpoint would."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


PAYLOADS = {
    'builtins.eval': _Payload(eval, f"open('{MARKER}', 'w').close()"),
    f'{os.system.__module__}.system': _Payload(os.system, f'touch {MARKER}'),
    'subprocess.Popen': _Payload(subprocess.Popen, ['touch', MARKER]),
}


@pytest.mark.parametrize('protocol', [2, 4])  # 4 names globals with STACK_GLOBAL
@pytest.mark.parametrize('legacy', [False, True])
@pytest.mark.parametrize('name', sorted(PAYLOADS))
def test_hostile_globals_refused(tmp_path, monkeypatch, name, legacy, protocol):
  monkeypatch.chdir(tmp_path)
  pkl = pickle.dumps({'state_dict': {}, 'x': PAYLOADS[name]}, protocol=protocol)
  path = (_write_legacy if legacy else _write_zip)(tmp_path / 'evil.pth', pkl)
  with pytest.raises(UnsafeCheckpointError, match=f"evil.pth: refused to load global '{name}'"):
    read_torch_file(path)
  assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize('module, name', [
    ('builtins', 'getattr'), ('builtins', 'exec'), ('builtins', '__import__'),
    ('builtins', 'open'), ('copyreg', '_reconstructor'), ('functools', 'partial'),
    ('numpy.core.multiarray', '_reconstruct'), ('torch', 'load'),
    ('torch._tensor', '_rebuild_from_type_v2'), ('torch.nn.modules.conv', 'Conv2d'),
])
def test_gadget_globals_refused(tmp_path, module, name):
  path = _write_zip(tmp_path / 'g.pth', b'\x80\x02' + _global(module, name) + b')R.')
  with pytest.raises(UnsafeCheckpointError, match=f"'{module}.{name}'"):
    read_torch_file(path)


def test_build_on_stand_in_refused(tmp_path):
  # BUILD (opcode 'b') on an allowed global would otherwise let a file rewrite the stand-in.
  path = _write_zip(tmp_path / 'b.pth', b'\x80\x02' + _global('collections', 'OrderedDict') +
                    b'}' + _str('_fn') + _global('builtins', 'set') + b'sb.')
  with pytest.raises(ValueError, match='set the state'):
    read_torch_file(path)


def test_truncated_zip(torch_dir, tmp_path):
  data = (torch_dir / 'spixnet_seed3.pth.tar').read_bytes()
  path = tmp_path / 'cut.pth.tar'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'cut\.pth\.tar: damaged'):
    read_torch_file(path)


def test_truncated_legacy(torch_dir, tmp_path):
  path = tmp_path / 'cut_legacy.pth.tar'
  shutil.copy(torch_dir / 'spixnet_seed3_ddp_legacy.pth.tar', path)
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size - 100)
  with pytest.raises(ValueError, match=r'cut_legacy\.pth\.tar: .*cut short'):
    read_torch_file(path)


@pytest.mark.parametrize('content', [np.random.default_rng(0).bytes(4096), b''])
def test_not_a_torch_file(tmp_path, content):
  path = tmp_path / 'noise.bin'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=r'noise\.bin: .*not a torch\.save file') as e:
    read_torch_file(path)
  assert not isinstance(e.value, UnsafeCheckpointError)


@pytest.mark.parametrize('filename', ['spixnet_seed3.pth.tar', 'spixnet_seed3_ddp_legacy.pth.tar'])
def test_the_converter_reads_official_torch_files_without_torch(torch_dir, segnet_seed3, tmp_path,
                                                                  monkeypatch, filename):
  from disco_jax.weights import convert  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` fails, installed or not
  out = tmp_path / 'spixnet.msgpack'
  convert.main([str(torch_dir / filename), str(out), '--spixnet'])
  want = convert.variables_from_state_dict(segnet_seed3, spixnet_only=True)
  got = convert.load_variables(out)
  assert jax_tree_equal(got, want)


def test_the_converter_refuses_the_malicious_file_by_name(torch_dir, tmp_path, monkeypatch):
  from disco_jax.weights import convert  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit, match='refused to load global'):
    convert.main([str(torch_dir / 'malicious.pth.tar'), str(tmp_path / 'out.msgpack')])
  assert not (tmp_path / MARKER).exists() and not (tmp_path / 'out.msgpack').exists()


def jax_tree_equal(a, b):
  """Same nested dict structure, and every leaf bit-identical (same dtype)."""
  if isinstance(a, dict):
    return isinstance(b, dict) and a.keys() == b.keys() and all(
        jax_tree_equal(a[k], b[k]) for k in a)
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
