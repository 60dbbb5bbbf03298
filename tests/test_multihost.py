"""Multi-host training for real: two `train.py` processes on localhost (one CPU device each, gloo
collectives, `--coordinator_address`) against one process with two devices, and preemption by
SIGTERM in both.

One workdir goes through three runs, each resuming the previous one's checkpoint:
  A: 2 processes, SIGTERM to process 1 only      -> both save step K1 and exit 42
  B: 1 process x 2 devices, resumes K1, SIGTERM  -> saves step K2, exits 42
  C: 2 processes, resume K2, run to K2 + 3       -> exits 0
and a reference R trains K2 + 3 steps in one process x 2 devices without a stop. The runs'
losses are compared step for step with R's.

Same numbers in both layouts: every run trains the tiny SPixNet on the same four photos (one
TFRecord shard) with a global batch of 4, squashed, not flipped and not shuffled
(shuffle_buffer 1). One process with two devices puts records 0-1 on device 0 and 2-3 on
device 1; two processes each read their own half of the records (0-1 and 2-3,
`tfds.split_for_jax_process`). So every device computes on the same images in both layouts, and
the gradient and BatchNorm all-reduce adds two numbers either way: the runs agree to the bit
(measured: largest difference 0). The tolerance, rtol 1e-6, allows a few float32 ulps and no
more. Measured with shuffling on (the same images, split differently across the two devices):
losses differ by 4e-7 at step 5 and 1e-5 at step 20, as Adam amplifies rounding noise. Two
processes reading the same half would train on other images and differ at step 1.

Measured: 3.6 minutes on the 2-core machine while other jobs ran (load 4.5); each process
imports TF and JAX and compiles; a two-process step takes about 0.4 s, a one-process one 0.03 s.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from disco_jax.training import checkpoint as ckpt_lib
from disco_jax.training import tasks, trainer
from disco_jax.weights import convert
from tests.conftest import REPO

_TIMEOUT_S = 900  # per run: generous, so that a loaded shared machine does not fail the test
_RTOL = 1e-6  # see the module docstring
_PREEMPTED = re.compile(r'preempted at step (\d+)')
_RESUMED = re.compile(r'resuming from the checkpoint at step (\d+)')
_EXTRA_STEPS = 3  # run C trains this many steps past B's stop


def _photos(folder):
  """Four 40x44 colour PNGs (blocks of colour plus noise)."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    img = np.repeat(np.repeat(rng.integers(0, 255, (4, 4, 3)), 12, 0), 12, 1)[:40, :44]
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / f'p{i}.png')
  return folder


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class _Runs:
  """`train.py` children of one test module, each with its own log file; all SIGKILLed on exit
  (SIGTERM would be taken as a preemption notice once jax.distributed is up)."""

  def __init__(self, root):
    self.root = root
    self.photos = _photos(root / 'photos')
    self.cache = root / 'jax_cache'
    self.procs = []

  def start(self, name, workdir, num_steps, processes, devices=1):
    """`processes` train.py children on one workdir -> their (Popen, log path) pairs."""
    args = [sys.executable, 'train.py', '--config', 'configs/spixnet.py:tiny',
            '--workdir', str(workdir), f'--config.optim.num_steps={num_steps}',
            '--config.input.dataset=folder', f'--config.input.folder={self.photos}',
            f'--config.input.data_dir={self.root / "tfds"}', '--config.input.image_size=32',
            '--config.input.global_batch_size=4', '--config.input.shuffle_buffer=1',
            '--config.input.resize=squash', '--config.input.random_flip=False',
            '--config.ckpt.every_steps=100000', '--config.eval.every_steps=100000',
            '--config.eval.max_batches=1', '--config.log.every_steps=1',
            '--config.log.images_every_steps=100000', '--config.log.num_images=2']
    env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
    env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               # Reruns of one layout load its executables instead of compiling them again.
               JAX_COMPILATION_CACHE_DIR=str(self.cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    if processes > 1:
      args += [f'--coordinator_address=localhost:{_free_port()}',
               f'--num_processes={processes}']
    started = []
    for i in range(processes):
      log = self.root / f'{name}.p{i}.log'
      with open(log, 'w') as out:
        proc = subprocess.Popen(args + ([f'--process_id={i}'] if processes > 1 else []),
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
      self.procs.append(proc)
      started.append((proc, log))
    return started

  def kill_all(self):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _logged_steps(workdir):
  """Steps of the training lines of `workdir/metrics.jsonl`, in file order."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  lines = [json.loads(l) for l in path.read_text().splitlines() if l.endswith('}')]
  return [l['step'] for l in lines if 'loss' in l]


def _losses(workdir):
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {l['step']: l['loss'] for l in lines if 'loss' in l}


def _wait_for_step(started, workdir, step):
  """Blocks until `metrics.jsonl` shows `step` while every child still runs."""
  deadline = time.monotonic() + _TIMEOUT_S
  while max(_logged_steps(workdir), default=0) < step:
    ended = [(p.returncode, log.read_text()[-3000:]) for p, log in started if p.poll() is not None]
    assert not ended, f'a child ended before step {step}: {ended}'
    assert time.monotonic() < deadline, f'step {step} not reached in {_TIMEOUT_S} s'
    time.sleep(0.05)


def _finish(started):
  """(return codes, log texts) once every child has ended."""
  for proc, _ in started:
    proc.wait(timeout=_TIMEOUT_S)
  return [p.returncode for p, _ in started], [log.read_text() for _, log in started]


def _one_match(pattern, text):
  found = {int(m) for m in pattern.findall(text)}
  assert len(found) == 1, (pattern.pattern, found, text[-3000:])
  return found.pop()


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """Runs A, B, C and R (module docstring) -> dict of their return codes, logs, stop steps and
  times; `workdir` is A-B-C's, `reference` R's."""
  runs = _Runs(tmp_path_factory.mktemp('multihost'))
  workdir, reference = runs.root / 'run', runs.root / 'reference'
  out = {'workdir': workdir, 'reference': reference, 'seconds': {}}
  never = 100000  # num_steps of the runs that SIGTERM stops
  try:
    t = time.monotonic()
    a = runs.start('a', workdir, never, processes=2)
    _wait_for_step(a, workdir, 2)
    a[1][0].send_signal(signal.SIGTERM)  # process 1 only: the service must stop process 0 too
    out['a'] = _finish(a)
    out['k1'] = _one_match(_PREEMPTED, out['a'][1][0])
    out['seconds']['a'] = time.monotonic() - t

    t = time.monotonic()
    b = runs.start('b', workdir, never, processes=1, devices=2)
    _wait_for_step(b, workdir, out['k1'] + 2)
    b[0][0].send_signal(signal.SIGTERM)
    out['b'] = _finish(b)
    out['k2'] = _one_match(_PREEMPTED, out['b'][1][0])
    out['seconds']['b'] = time.monotonic() - t

    t = time.monotonic()
    out['c'] = _finish(runs.start('c', workdir, out['k2'] + _EXTRA_STEPS, processes=2))
    out['seconds']['c'] = time.monotonic() - t

    t = time.monotonic()
    out['r'] = _finish(runs.start('r', reference, out['k2'] + _EXTRA_STEPS, processes=1,
                                  devices=2))
    out['seconds']['r'] = time.monotonic() - t
    print('run seconds', {k: round(v, 1) for k, v in out['seconds'].items()},
          'stops', out['k1'], out['k2'])
  finally:
    runs.kill_all()
  return out


def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(chain):
  codes, logs = chain['a']
  assert codes == [trainer.PREEMPTED_EXIT_CODE] * 2, [l[-3000:] for l in logs]
  k1 = chain['k1']
  assert _one_match(_PREEMPTED, logs[1]) == k1 >= 2  # the same step on both processes
  assert 'over 2 devices (2 processes)' in logs[0]
  # Process 1's step was saved: run B starts from it.
  assert _one_match(_RESUMED, chain['b'][1][0]) == k1


def test_sigterm_to_one_process_saves_the_current_step_and_exits_42(chain):
  codes, logs = chain['b']
  assert codes == [trainer.PREEMPTED_EXIT_CODE], logs[0][-3000:]
  assert 'over 2 devices (1 processes)' in logs[0]
  k2 = chain['k2']
  assert k2 >= chain['k1'] + 2
  assert k2 in ckpt_lib.Checkpointer(chain['workdir'] / 'checkpoints').all_steps()
  # Both processes of run C resume from that step and finish.
  codes, logs = chain['c']
  assert codes == [0, 0], [l[-3000:] for l in logs]
  assert [_one_match(_RESUMED, l) for l in logs] == [k2, k2]


def test_two_processes_compute_what_one_process_computes(chain):
  """Losses of A (2 processes), B (1 process, from A's checkpoint) and C (2 processes, from B's)
  against the uninterrupted one-process run, and the final weights (rtol: module docstring)."""
  assert chain['r'][0] == [0], chain['r'][1][0][-3000:]
  steps = chain['k2'] + _EXTRA_STEPS
  ours, ref = _losses(chain['workdir']), _losses(chain['reference'])
  assert sorted(ours) == sorted(ref) == list(range(1, steps + 1))
  ours, ref = np.array([ours[s] for s in sorted(ours)]), np.array([ref[s] for s in sorted(ref)])
  print('largest relative loss difference', np.max(np.abs(ours / ref - 1)))
  np.testing.assert_allclose(ours, ref, rtol=_RTOL, atol=0)
  # The stage-1 export holds every parameter and BatchNorm statistic of the last step.
  a = convert.load_variables(chain['workdir'] / tasks.SPIXNET_EXPORT)
  b = convert.load_variables(chain['reference'] / tasks.SPIXNET_EXPORT)
  diffs = _max_rel_diff(a, b)
  print('largest relative weight difference', diffs)
  assert diffs <= _RTOL


def _max_rel_diff(a, b):
  """Largest |a - b| / max(|b|, 1e-3) over two nested dicts of arrays with the same keys (the
  floor keeps near-zero weights from turning rounding into large ratios)."""
  if isinstance(a, dict):
    assert a.keys() == b.keys()
    return max(_max_rel_diff(a[k], b[k]) for k in a)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3), initial=0.0))


def test_only_process_0_writes_logs_metrics_and_images(chain):
  workdir = chain['workdir']
  # Each step once: a second writer of metrics.jsonl would repeat every line.
  assert _logged_steps(workdir) == list(range(1, chain['k2'] + _EXTRA_STEPS + 1))
  # One TensorBoard file per run (A, B, C); process 1 of A and C would add two.
  assert len(list((workdir / 'tensorboard').glob('events.out.tfevents.*'))) == 3
  assert [p.name for p in (workdir / 'samples').iterdir()] == [
      f'samples_{chain["k2"] + _EXTRA_STEPS:08d}.png']
  for run in ('a', 'c'):
    process_0, process_1 = chain[run][1]
    assert re.search(r'step \d+/\d+ \(', process_0)
    assert not re.search(r'step \d+/\d+ \(|validation:|parameters:', process_1), process_1[-3000:]


def test_preemption_notice_catches_sigterm_in_one_process():
  """Without jax.distributed (as in this pytest process) the notice is a SIGTERM handler, put
  back as it was by `close`; off the main thread, where Python sets no handlers, it says so."""
  caught = []
  previous = signal.signal(signal.SIGTERM, lambda *_: caught.append(1))
  try:
    notice = ckpt_lib.PreemptionNotice(checkpointer=None)
    assert not notice.reached(7)
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.reached(8) and not caught
    notice.close()
    os.kill(os.getpid(), signal.SIGTERM)
    assert caught == [1]

    in_thread = []
    thread = threading.Thread(target=lambda: in_thread.append(ckpt_lib.PreemptionNotice(None)))
    thread.start()
    thread.join()
    os.kill(os.getpid(), signal.SIGTERM)
    assert caught == [1, 1]
  finally:
    signal.signal(signal.SIGTERM, previous)
