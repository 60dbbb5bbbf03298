"""Numerical faults end to end: a NaN in a batch and a diverging learning rate stop train.py with
the step and the cause named, a non-zero exit, and the last good checkpoint untouched.

Each case reruns `train.py` (stage 1, 32 px, batch 2, one CPU device) on a copy of a workdir that
holds a good checkpoint at step 2. The children share a compilation cache with the other
subprocess tests of the session (tests/test_resume.py uses the same config).
"""
import hashlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import spixnet as spixnet_configs
from disco_jax.training import trainer, validate
from tools import kill_resume


def _train_py(args, workdir, cache_dir):
  return subprocess.run([sys.executable, 'train.py', *args, f'--workdir={workdir}'],
                        cwd=kill_resume.REPO, env=kill_resume.subprocess_env(cache_dir),
                        capture_output=True, text=True, timeout=600)


def _digests(folder):
  """{relative path: sha256} of every file under `folder`."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir with a good checkpoint at step 2, train.py flags, cache dir)."""
  root = tmp_path_factory.mktemp('numerical')
  cache_dir = tmp_path_factory.getbasetemp() / 'jax_cache'
  args = kill_resume.tiny_spixnet_args(kill_resume.write_photos(root / 'photos'), root / 'tfds',
                                       num_steps=2, every_steps=2)
  out = _train_py(args, root / 'good', cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  return root / 'good', args, cache_dir


def _fault_run(trained, tmp_path, *flags):
  """Reruns train.py for 6 steps with `flags` on a copy of the good workdir; returns
  (completed process, workdir, digests of checkpoint 2 before the run)."""
  good, args, cache_dir = trained
  workdir = tmp_path / 'run'
  shutil.copytree(good, workdir)
  before = _digests(workdir / 'checkpoints' / '2')
  out = _train_py([*args, '--config.optim.num_steps=6', *flags], workdir, cache_dir)
  return out, workdir, before


def _assert_clean_stop(out, workdir, before, message):
  """Exit 1 with `error: <message>...` as the last line and no traceback; checkpoint 2 is the
  only step, byte-identical to before the run, and restores."""
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {message}'), out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2']
  assert _digests(workdir / 'checkpoints' / '2') == before
  _, state = trainer.restore_trained(str(workdir))
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state))
  return last


def test_nan_in_a_batch_stops_naming_step_and_terms(trained, tmp_path):
  out, workdir, before = _fault_run(trained, tmp_path, '--config.debug.nan_at_step=4')
  last = _assert_clean_stop(out, workdir, before, 'non-finite value at step 4: ')
  assert 'loss' in last and 'spixel' in last and 'not applied and not saved' in last
  # Step 3 ran and was logged; step 4, whose checkpoint was due, was neither logged nor saved.
  assert 'resuming from the checkpoint at step 2' in out.stderr and 'step 3/6' in out.stderr
  assert 'step 4/6' not in out.stderr


def test_learning_rate_1e6_is_stopped_as_diverged(trained, tmp_path):
  """At lr 1e6 the loss stays finite (measured: the first update is ~1e7 x the parameters' norm,
  then the gradients are exactly 0 and the loss wanders between 1.5 and 4), so the non-finite
  check alone never fires; the update-size check stops the first step."""
  out, workdir, before = _fault_run(trained, tmp_path, '--config.optim.learning_rate=1e6')
  last = _assert_clean_stop(out, workdir, before, 'training diverged at step 3: ')
  assert 'config.optim.max_update_ratio=1' in last and 'lower config.optim.learning_rate' in last


def test_divergence_check_names_step_ratio_and_limit():  # pylint: disable=protected-access
  metrics = {'loss': jnp.float32(2.5), 'lr': jnp.float32(1e6), 'finite': jnp.bool_(True),
             'update_ratio': jnp.float32(3e6)}
  with pytest.raises(trainer.Diverged, match=r'at step 8: .* by 3e\+06 times their norm .*'
                                           r'max_update_ratio=1;'):
    trainer.PendingMetrics([(7, metrics)], max_update_ratio=1.0).flush()
  # With the check off (0) the same step passes and its scalars come back.
  assert trainer.PendingMetrics([(7, metrics)]).flush()['update_ratio'] == 3e6


def test_bad_fault_fields_are_named(trained):
  good, _, _ = trained
  config = spixnet_configs.get_config('tiny')
  config.input.update(dataset='folder', folder=str(good.parent / 'photos'),
                      data_dir=str(good.parent / 'tfds'))
  config.debug.nan_at_step = 0
  config.optim.max_update_ratio = -1.0
  with pytest.raises(validate.ConfigError) as err:
    validate.validate_config(config)
  assert 'config.debug.nan_at_step=0: must be -1 (off) or a step number >= 1' in str(err.value)
  assert 'config.optim.max_update_ratio=-1.0: must be >= 0' in str(err.value)
