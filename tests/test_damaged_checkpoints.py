"""Damaged and foreign checkpoints end to end, through `train.py` and `eval.py`.

A data file cut short, a file missing and garbled metadata in the newest steps make both entry
points fall back to the newest good step with a warning naming each damaged step and what is
wrong; a checkpoint of another model width is refused with the mismatched shapes and a clean
`error:` line, and nothing in the workdir changes.

One trained stage-1 workdir (train.py, steps 2, 4, 6, 8) and one stage-2 workdir are copied for
each case. eval.py needs a colorizer, and training or even initialising the tiny one costs ~30 s
of compiling on 2 cores, so the stage-2 workdir holds the config.json train.py would write and
checkpoints at steps 2..8 of a train state with the model's exact tree and shapes and random
values, saved by the trainer's Checkpointer. The children share a compilation cache with the other
subprocess tests of the session.
"""
import asyncio
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
from orbax.checkpoint._src import asyncio_utils as ocp_asyncio
import pytest

from configs import disco as disco_configs
from disco_jax.training import checkpoint as ckpt_lib
from disco_jax.training import optim, tasks, trainer
from tools import kill_resume

STEPS = [2, 4, 6, 8]


def _run(script, args, cache_dir):
  return subprocess.run([sys.executable, script, *args], cwd=kill_resume.REPO,
                        env=kill_resume.subprocess_env(cache_dir), capture_output=True, text=True,
                        timeout=600)


def _digests(folder):
  """{relative path: sha256} of every file under `folder`."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def _data_files(step_dir):
  """The array data files of a step (OCDBT `d/` files), biggest first."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  return sorted(files, key=lambda p: -p.stat().st_size)


def _truncate(step_dir):
  biggest = _data_files(step_dir)[0]
  with open(biggest, 'r+b') as f:
    f.truncate(biggest.stat().st_size // 2)


def _remove_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').unlink()


def _remove_data_file(step_dir):
  _data_files(step_dir)[0].unlink()


def _garble_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').write_text('{"tree_metadata": {"params": ')


def _damage(workdir, damages):
  """Applies {step: damage function} to the steps of `workdir`."""
  for step, damage in damages.items():
    damage(workdir / 'checkpoints' / str(step))


def _assert_fell_back(stderr, workdir, damages, problems):
  """One warning per damaged step, naming it, the directory and the problem; the damaged steps
  are moved aside as `<step>.damaged-<time>`."""
  warnings = [l for l in stderr.splitlines() if 'falling back to the previous checkpoint' in l]
  for step, problem in zip(damages, problems):
    line = next((l for l in warnings if f'checkpoint step {step} in ' in l), None)
    assert line is not None, stderr[-4000:]
    assert problem in line and str(workdir / 'checkpoints') in line, line
  aside = sorted(p.name.split('.')[0] for p in (workdir / 'checkpoints').iterdir()
                 if '.damaged-' in p.name)
  assert aside == sorted(str(s) for s in damages)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.getbasetemp() / 'jax_cache'


@pytest.fixture(scope='module')
def stage1(tmp_path_factory, cache_dir):
  """(workdir trained 8 steps with checkpoints at STEPS, train.py flags)."""
  root = tmp_path_factory.mktemp('damaged1')
  args = kill_resume.tiny_spixnet_args(kill_resume.write_photos(root / 'photos'), root / 'tfds',
                                       num_steps=8, every_steps=2) + ['--config.ckpt.keep=4']
  out = _run('train.py', [*args, f'--workdir={root / "good"}'], cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  return root / 'good', args


def _random_state(abstract, seed=0):
  """A train state shaped like `abstract` with small random values (BatchNorm variances 1, so the
  forward pass stays finite) and integer leaves 0."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
      return jax.numpy.zeros(x.shape, x.dtype)
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jax.numpy.ones(x.shape, x.dtype)
    return jax.numpy.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope='module')
def stage2(stage1):
  """A colorizer workdir as train.py leaves it: config.json and checkpoints at STEPS (the same
  random state, each saved with its own step number)."""
  good1, _ = stage1
  workdir = good1.parent / 'disco'
  config = disco_configs.get_config('tiny')
  config.input.update(dataset='folder', folder=str(good1.parent / 'photos'),
                      data_dir=str(good1.parent / 'tfds'), image_size=32, global_batch_size=2,
                      eval_split='train')
  config.spixnet_checkpoint = str(good1)
  task = tasks.DiscoTask(config)
  tx = optim.make_optimizer(config.optim, optim.learning_rate_schedule(config.optim, 1),
                                  frozen=task.frozen)
  state = _random_state(jax.eval_shape(lambda: trainer.create_state(task, tx, config.seed)))
  workdir.mkdir()
  trainer.write_config(config, str(workdir))
  checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints', keep=len(STEPS))
  for step in STEPS:
    checkpointer.save(step, state.replace(step=jax.numpy.asarray(step, jax.numpy.int32)))
  checkpointer.close()
  return workdir


def test_train_py_falls_back_past_three_damaged_steps_and_redoes_them(stage1, tmp_path,
                                                                      cache_dir):
  good, args = stage1
  workdir = tmp_path / 'run'
  shutil.copytree(good, workdir)
  damages = {8: _truncate, 6: _remove_metadata, 4: _garble_metadata}
  _damage(workdir, damages)
  out = _run('train.py', [*args, f'--workdir={workdir}'], cache_dir)
  assert out.returncode == 0, out.stderr[-4000:]
  _assert_fell_back(out.stderr, workdir, damages,
                    ['OUT_OF_RANGE', 'state/_METADATA is missing', 'JSONDecodeError'])
  assert 'resuming from the checkpoint at step 2' in out.stderr
  # Steps 4..8 were trained and saved again, and equal the undamaged run's bit for bit.
  assert ckpt_lib.Checkpointer(workdir / 'checkpoints').all_steps() == STEPS
  _, redone = kill_resume.final_state(workdir)
  _, original = kill_resume.final_state(good)
  assert kill_resume.compare(original, redone) == (True, 0.0, [])


def test_train_py_with_every_step_damaged_stops_cleanly(stage1, tmp_path, cache_dir):
  good, args = stage1
  workdir = tmp_path / 'run'
  shutil.copytree(good, workdir)
  _damage(workdir, {step: _remove_data_file for step in STEPS})
  out = _run('train.py', [*args, f'--workdir={workdir}'], cache_dir)
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: no checkpoint in {workdir / "checkpoints"} can be restored: '
                         'steps [2, 4, 6, 8] are all damaged'), last


def test_train_py_refuses_another_width_and_changes_nothing(stage1, tmp_path, cache_dir):
  good, args = stage1
  workdir = tmp_path / 'run'
  shutil.copytree(good, workdir)
  before = _digests(workdir)
  out = _run('train.py', [*args, f'--workdir={workdir}', '--config.model.spix_width=8'],
             cache_dir)
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  error = out.stderr[out.stderr.index('error: '):]
  assert error.startswith(f'error: checkpoint step 8 in {workdir / "checkpoints"} does not fit '
                          'the model'), error
  # Every array of the model changes shape (181 paths, the first 20 listed): the BatchNorm after
  # the first convolution has spix_width channels.
  assert '(181 mismatched paths)' in error and '... and 161 more' in error
  assert 'model_state/batch_stats/conv0a_1/mean: (4,) in the checkpoint, (8,) in the model' in error
  assert _digests(workdir) == before  # config.json included: eval.py still reads the right model


def test_eval_py_falls_back_and_reports_the_step_it_read(stage2, tmp_path, cache_dir):
  workdir = tmp_path / 'disco'
  shutil.copytree(stage2, workdir)
  damages = {8: _remove_data_file, 6: _truncate, 4: _garble_metadata}
  _damage(workdir, damages)
  out = _run('eval.py', [f'--workdir={workdir}', '--max_batches=1', '--num_images=1'], cache_dir)
  assert out.returncode == 0, out.stderr[-4000:]
  # A data file gone reads as an empty one in OCDBT: 'Truncated Zstd-compressed stream'.
  _assert_fell_back(out.stderr, workdir, damages,
                    ['FAILED_PRECONDITION', 'OUT_OF_RANGE', 'JSONDecodeError'])
  metrics = json.loads((workdir / 'eval' / 'metrics.json').read_text())
  assert metrics['step'] == 2 and metrics['num_images'] == 2


def test_eval_py_refuses_another_width(stage2, tmp_path, cache_dir):
  workdir = tmp_path / 'disco'
  shutil.copytree(stage2, workdir)
  config = json.loads((workdir / 'config.json').read_text())
  config['model']['d_model'] = 32
  (workdir / 'config.json').write_text(json.dumps(config))
  before = _digests(workdir / 'checkpoints')
  out = _run('eval.py', [f'--workdir={workdir}'], cache_dir)
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  error = out.stderr[out.stderr.index('error: '):]
  assert error.startswith(f'error: checkpoint step 8 in {workdir / "checkpoints"} does not fit '
                          'the model'), error
  assert ': (16,) in the checkpoint, (32,) in the model' in error
  assert _digests(workdir / 'checkpoints') == before


def test_leftovers_of_abandoned_reads_are_dropped_and_nothing_else(monkeypatch):
  """After a failed read, TensorStore's late callbacks ('Event loop is closed') and Orbax's
  abandoned read coroutines reach sys.unraisablehook: dropped; anything else is passed on."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  ckpt_lib.quiet_abandoned_reads()  # pylint: disable=protected-access
  hook = sys.unraisablehook
  ckpt_lib.quiet_abandoned_reads()  # pylint: disable=protected-access
  assert sys.unraisablehook is hook  # installed once, however many reads fail
  orbax_coroutine = ocp_asyncio.cancellable(None)  # any coroutine of Orbax's code
  other = types.SimpleNamespace(exc_value=RuntimeError('something else'), object=None)
  hook(types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'), object=None))
  hook(types.SimpleNamespace(exc_value=ValueError('read failed'), object=orbax_coroutine))
  hook(other)
  orbax_coroutine.close()
  assert seen == [other]


def test_asyncio_records_of_abandoned_orbax_reads_are_dropped_and_nothing_else(monkeypatch):
  """asyncio's 'never retrieved' records are dropped when the error was raised in Orbax's code or
  set by TensorStore; the same record with an error of other code, and other asyncio records,
  pass."""
  monkeypatch.setattr(sys, 'unraisablehook', lambda unraisable: None)
  asyncio_logger = logging.getLogger('asyncio')
  monkeypatch.setattr(asyncio_logger, 'filters', [])
  ckpt_lib.quiet_abandoned_reads()  # pylint: disable=protected-access

  def record(msg, exc):
    return logging.LogRecord('asyncio', logging.ERROR, __file__, 0, msg, None,
                             (type(exc), exc, exc.__traceback__) if exc else None)

  def raised(coroutine):
    try:
      asyncio.run(coroutine)
    except Exception as e:  # pylint: disable=broad-except
      return e
    raise AssertionError('the coroutine did not raise')

  async def ours():
    raise ValueError('not a read')

  in_orbax = raised(ocp_asyncio.cancellable(ours()))  # the error passes through Orbax's frames
  in_ours = raised(ours())
  message = 'Task exception was never retrieved\nfuture: <Task finished>'
  assert not asyncio_logger.filter(record(message, in_orbax))
  for name in 'Future', '_GatheringFuture':
    assert not asyncio_logger.filter(record(message.replace('Task', name, 1), in_orbax))
  assert asyncio_logger.filter(record(message, in_ours))
  assert asyncio_logger.filter(record('Executing <Task> took 2.1 seconds', in_orbax))
  assert asyncio_logger.filter(record(message, None))
  # TensorStore's read errors reach their futures from C++: no traceback, an absl status first.
  status = ValueError('FAILED_PRECONDITION: Error reading "a/0.0" in OCDBT database: Truncated')
  assert not asyncio_logger.filter(record(message.replace('Task', 'Future', 1), status))
  assert asyncio_logger.filter(record(message, ValueError('no traceback, no status code')))
