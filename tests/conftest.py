"""Test set-up: four virtual CPU devices (for the sharded tests) and the parity fixtures' folder."""
import atexit
import functools
import importlib.util
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

# Must happen before any computation creates the CPU backend.
jax.config.update('jax_num_cpu_devices', 4)

# One persistent compilation cache for the session, inherited through the environment by the
# processes the tests start (unless they name their own): a tiny step compiles once rather than
# in every test that builds it. It starts empty, so each session still compiles everything once.
_CACHE = tempfile.mkdtemp(prefix='disco-jax-test-xla-cache-')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
jax.config.update('jax_compilation_cache_dir', _CACHE)

REPO = pathlib.Path(__file__).resolve().parent.parent


def parity_dir() -> pathlib.Path:
  """DISCO_PARITY_DIR, or `../shared/parity` beside the repository."""
  return pathlib.Path(os.environ.get('DISCO_PARITY_DIR', REPO.parent / 'shared' / 'parity'))


@functools.cache
def make_state_dict(folder, seed):
  """`make_state_dict.py`'s official-layout synthetic weights for `seed` (cached: do not mutate)."""
  spec = importlib.util.spec_from_file_location('make_state_dict', folder / 'make_state_dict.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.make_state_dict(str(folder / 'official_keys.tsv'), seed=seed)


@pytest.fixture(scope='session')
def parity():
  path = parity_dir()
  if not (path / 'official_keys.tsv').exists():
    pytest.skip(f'parity fixtures not found at {path} (set DISCO_PARITY_DIR to the folder holding '
                'official_keys.tsv, make_state_dict.py and case_*.npz)')
  return path
