"""Exact resume under SIGKILL: kill `train.py` at random moments, rerun it, compare to a clean one.

  python tools/kill_resume.py --root /tmp/kill_resume --kills 5 --seed 0 [--task disco]

`campaign` trains once without interruption (the reference), then trains the same command in a
fresh workdir, killing it with SIGKILL `kills` times and rerunning it after each kill until it
finishes. The final checkpoints of both runs (step, parameters, Adam state, BatchNorm statistics,
spectral vectors where the model has them) must be bit-identical: the trainer promises that a
resumed run computes exactly what an uninterrupted one does (the batch sequence and every random
key are pure functions of the step). `--task spixnet` (the default) runs the tiny stage 1;
`--task disco` the tiny colorizer with all its state and randomness in play (dropout, k-means
anchors, spectral-norm vectors, the VGG19 term on a random weights file), after a 2-step stage-1
run for its SPixNet.

Kill moments, drawn from a seeded RNG and watched by polling the workdir every millisecond:
- 'step': a random part of one step's time after `metrics.jsonl` reports a step, so the kill lands
  while the next batch is read or the next step computes;
- 'save': right after a `<step>.orbax-checkpoint-tmp` folder appears, i.e. while an async
  checkpoint is being written (whether it was still in flight when the signal went is recorded);
- 'between': the moment `metrics.jsonl` reports a step, while the host logs and checkpoints
  between two steps.

The subprocesses see `--xla_force_host_platform_device_count` devices (both runs the same) and
share a persistent JAX compilation cache, so that a rerun takes seconds rather than recompiling:
the reference run compiles and fills the cache, the others load the same executables from it.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
KINDS = ('step', 'save', 'between')
_TMP_SUFFIX = '.orbax-checkpoint-tmp'
_POLL_S = 0.001
_RESUMED = re.compile(r'resuming from the checkpoint at step (\d+)')


def write_photos(folder, count=8, seed=0):
  """`count` small colour PNGs (blocks of colour plus noise, 40..89 px a side) in `folder`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    h, w = rng.integers(40, 90, 2)
    img = np.repeat(np.repeat(rng.integers(0, 255, (4, 4, 3)), 24, 0), 24, 1)[:h, :w]
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / f'p{i}.png')
  return folder


def tiny_spixnet_args(photos, data_dir, num_steps=24, every_steps=2):
  """train.py flags for the cheapest run with BatchNorm and Adam state: stage 1 at 32 px, batch 2,
  a checkpoint every `every_steps` steps, validation only at the end."""
  return ['--config', 'configs/spixnet.py:tiny', '--config.input.dataset=folder',
          f'--config.input.folder={photos}', f'--config.input.data_dir={data_dir}',
          '--config.input.image_size=32', '--config.input.global_batch_size=2',
          '--config.input.shuffle_buffer=16', f'--config.optim.num_steps={num_steps}',
          f'--config.ckpt.every_steps={every_steps}', '--config.ckpt.keep=2',
          f'--config.eval.every_steps={10 * num_steps}', '--config.eval.max_batches=1',
          '--config.log.every_steps=1', f'--config.log.images_every_steps={10 * num_steps}']


def tiny_disco_args(photos, data_dir, spixnet, vgg_weights, num_steps=24, every_steps=2):
  """train.py flags for the tiny colorizer with everything that draws on state or randomness:
  transformer dropout, k-means anchors, spectral-norm power iterations and the VGG19 term, at
  32 px, batch 2, a checkpoint every `every_steps` steps, validation only at the end."""
  return ['--config', 'configs/disco.py:tiny', '--config.input.dataset=folder',
          f'--config.input.folder={photos}', f'--config.input.data_dir={data_dir}',
          '--config.input.image_size=32', '--config.input.global_batch_size=2',
          '--config.input.shuffle_buffer=16', f'--config.spixnet_checkpoint={spixnet}',
          '--config.model.dropout=0.1', '--config.model.random_anchors=False',
          '--config.loss.perceptual_weight=5.0', f'--config.loss.vgg_weights={vgg_weights}',
          f'--config.optim.num_steps={num_steps}', f'--config.ckpt.every_steps={every_steps}',
          '--config.ckpt.keep=2', f'--config.eval.every_steps={10 * num_steps}',
          '--config.eval.max_batches=1', '--config.log.every_steps=1',
          f'--config.log.images_every_steps={10 * num_steps}']


def write_vgg19(path, seed=0):
  """A VGG19 weights file as `weights.vgg19.save_vgg19` writes it, with VGG19Features' random
  initial weights: the perceptual term's cost and gradients without ImageNet's file."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from disco_jax.models import vgg  # pylint: disable=g-import-not-at-top
  from disco_jax.weights import vgg19  # pylint: disable=g-import-not-at-top
  init = jax.jit(lambda: vgg.VGG19Features().init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3))))
  vgg19.save_vgg19(str(path), init()['params'], 'torch')
  return path


def disco_args(root, env, num_steps=24, every_steps=2, timeout=600):
  """`tiny_disco_args` on photos written under `root`, after what stage 2 needs: a 2-step stage-1
  run of `tiny_spixnet_args` (its SPixNet export) and a random VGG19 file."""
  root = pathlib.Path(root)
  photos, data_dir = write_photos(root / 'photos'), root / 'tfds'
  spix = _Run.start(tiny_spixnet_args(photos, data_dir, num_steps=2), root / 'spixnet',
                    root / 'spixnet.log', env)
  if spix.wait(timeout) != 0:
    raise RuntimeError(f'the stage-1 run failed (exit {spix.proc.returncode}):\n{spix.tail()}')
  vgg_weights = write_vgg19(root / 'vgg19.msgpack')
  return tiny_disco_args(photos, data_dir, spix.workdir, vgg_weights, num_steps, every_steps)


def _flag(args, name):
  """The value of `--name=v` in `args` (the last one wins, as absl does)."""
  values = [a.split('=', 1)[1] for a in args if a.startswith(f'--{name}=')]
  if not values:
    raise ValueError(f'config_args lack --{name}=N, which the kill schedule needs')
  return int(values[-1])


def subprocess_env(cache_dir, devices=1):
  """The environment of a train.py/eval.py child: `devices` CPU devices and a persistent
  compilation cache in `cache_dir` that every child given the same directory shares."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             # Cache every executable, however small or quick to compile.
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             TF_CPP_MIN_LOG_LEVEL='2')
  return env


@dataclasses.dataclass
class _Run:
  """One train.py process, its log file and the workdir it writes."""
  proc: subprocess.Popen
  log: pathlib.Path
  workdir: pathlib.Path

  @classmethod
  def start(cls, args, workdir, log, env):
    cmd = [sys.executable, 'train.py', *args, f'--workdir={workdir}']
    with open(log, 'w') as out:  # the child keeps its own copy of the descriptor
      proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return cls(proc, pathlib.Path(log), pathlib.Path(workdir))

  def logged_step(self):
    """The last step `metrics.jsonl` reports (0 if none). A line cut short by a kill is skipped."""
    try:
      lines = (self.workdir / 'metrics.jsonl').read_text().splitlines()
    except FileNotFoundError:
      return 0
    for line in reversed(lines):
      try:
        return json.loads(line)['step']
      except (ValueError, KeyError):
        continue
    return 0

  def checkpoints(self):
    """(committed steps, steps whose save is in flight) in the workdir's checkpoint folder."""
    try:
      names = os.listdir(self.workdir / 'checkpoints')
    except FileNotFoundError:
      return [], []
    done = sorted(int(n) for n in names if n.isdigit())
    tmp = sorted(int(n.split('.')[0]) for n in names if _TMP_SUFFIX in n)
    return done, tmp

  def wait(self, timeout):
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise RuntimeError(f'train.py ran past {timeout} s; its log: {self.log}') from None

  def tail(self, n=3000):
    return self.log.read_text()[-n:]


def _wait_for(run, ready, timeout):
  """Polls `ready()` until true (-> True) or until the process exits (-> False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if ready():
      return True
    if run.proc.poll() is not None:
      return False
    time.sleep(_POLL_S)
  raise RuntimeError(f'no kill moment within {timeout} s; log: {run.log}')


def _step_time(metrics_file, every):
  """Median seconds between the lines of steps t and t + 1 when no save starts after t: the time
  of one step with its batch, as the run saw it."""
  logged = {}
  for line in metrics_file.read_text().splitlines():
    record = json.loads(line)
    if 'loss' in record:
      logged[record['step']] = record['time']
  gaps = [logged[t + 1] - logged[t] for t in logged if t % every and t + 1 in logged]
  return float(np.median(gaps)) if gaps else 0.05


def _plan(rng, kills):
  """Each kind at least once (for kills >= 3), the rest drawn at random, in a random order."""
  kinds = list(KINDS[:kills]) + list(rng.choice(KINDS, max(0, kills - len(KINDS))))
  return [str(k) for k in rng.permutation(kinds)]


def _kill_once(run, kind, rng, num_steps, every, step_time, timeout):
  """Waits for a moment of `kind` later than the latest checkpoint, SIGKILLs, returns the record.

  A save can take longer than a few steps, but only one is in flight at a time (Orbax waits for
  the previous one before starting the next): once step b + 2 every + 1 is logged, or the save of
  b + 2 every has begun, the save of b + every has committed. Targets from there on make every
  rerun resume from a later checkpoint than the one before, until they reach the end of the run.
  """
  committed, _ = run.checkpoints()
  base = max(committed, default=0)
  delay = 0.0
  if kind == 'save':
    # The second or third save from here (or the final, forced one).
    target = min((base // every + int(rng.integers(2, 4))) * every, num_steps)
    ready = lambda: any(s >= target for s in run.checkpoints()[1])
    delay = float(rng.uniform(0, 0.005))
  else:
    # Never the last step, so that the kill comes before the run can finish.
    target = min(base + 2 * every + 1 + int(rng.integers(0, every + 1)), num_steps - 1)
    if kind == 'step':
      # A step after which no save starts, so that the next step is dispatched at once and the
      # kill lands while it reads its batch or computes.
      target -= target % every == 0
      delay = float(rng.uniform(0, step_time))
    ready = lambda: run.logged_step() >= target
  record = dict(kind=kind, target_step=target, delay_s=round(delay, 4), resumed_from=base)
  if not _wait_for(run, ready, timeout):
    record.update(killed=False, exit_code=run.proc.returncode)
    return record
  time.sleep(delay)
  committed, in_flight = run.checkpoints()
  run.proc.send_signal(signal.SIGKILL)
  run.proc.wait()
  after, left = run.checkpoints()
  record.update(killed=True, logged_step=run.logged_step(), committed=committed,
                saves_in_flight=in_flight, committed_after=after, tmp_left=left)
  return record


def final_state(workdir):
  """(step, {path: np.ndarray}) of the latest checkpoint of a train.py workdir: every leaf of the
  train state (optimizer state included)."""
  import jax  # pylint: disable=g-import-not-at-top
  from disco_jax.training import trainer  # pylint: disable=g-import-not-at-top
  _, state = trainer.restore_trained(str(workdir))
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return int(state.step), {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x)
                           for p, x in leaves}


def compare(a, b):
  """(identical, max |a - b| over all leaves, names of differing leaves) of two final_state dicts.

  Identity is bitwise per leaf (same dtype, shape and bytes: a NaN equals the same NaN, -0.0
  differs from 0.0); a leaf of another shape or dtype, or present in one tree only, counts as
  different with an infinite difference."""
  diff, differing = 0.0, []
  for name in sorted(a.keys() | b.keys()):
    x, y = a.get(name), b.get(name)
    if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
      differing.append(name)
      diff = float('inf')
      continue
    if x.tobytes() != y.tobytes():
      differing.append(name)
      diff = max(diff, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
  return not differing, diff, differing


TASKS = ('spixnet', 'disco')


def campaign(workdir_root, kills=5, seed=0, config_args=None, devices=1, timeout=600,
             cache_dir=None, task='spixnet', num_steps=24):
  """Reference run, then a run killed `kills` times and resumed; compares their final checkpoints.

  Args:
    workdir_root: an empty or new directory; photos, the TFDS data, the compilation cache, both
      workdirs and one log per process go there.
    kills: SIGKILLs sent to the second run before it may finish.
    seed: seeds the kill plan (kinds, target steps, delays).
    config_args: train.py flags without --workdir (must include --config.optim.num_steps=N and
      --config.ckpt.every_steps=N); default: `task`'s tiny flags on photos written here.
    devices: CPU devices of every subprocess (XLA_FLAGS).
    timeout: seconds any one process may take.
    cache_dir: the JAX compilation cache (default workdir_root/jax_cache); share one between
      campaigns and tests with the same config to compile once.
    task: without config_args, 'spixnet' (stage 1, `tiny_spixnet_args`) or 'disco' (stage 2,
      `disco_args`: a short stage-1 run and a random VGG19 file first).
    num_steps: without config_args, the length of both runs.

  Returns:
    dict(kills, kills_survived (kills after which a rerun resumed from a checkpoint, or started
    afresh when none was committed yet, and went on), resumes_bit_identical, max_abs_diff (0.0
    when identical), differing and compared (leaf paths), steps (the final step of each run),
    reference_s, step_time_s (one step of the reference), details (one dict per process of the
    killed run: its kill record, or the final run's exit)).
  """
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; choose one of {TASKS}')
  root = pathlib.Path(workdir_root)
  root.mkdir(parents=True, exist_ok=True)
  env = subprocess_env(cache_dir or root / 'jax_cache', devices)
  if config_args is None and task == 'disco':
    config_args = disco_args(root, env, num_steps, timeout=timeout)
  elif config_args is None:
    config_args = tiny_spixnet_args(write_photos(root / 'photos'), root / 'tfds', num_steps)
  num_steps = _flag(config_args, 'config.optim.num_steps')
  every = _flag(config_args, 'config.ckpt.every_steps')
  rng = np.random.default_rng(seed)

  start = time.monotonic()
  ref = _Run.start(config_args, root / 'reference', root / 'reference.log', env)
  if ref.wait(timeout) != 0:
    raise RuntimeError(f'the reference run failed (exit {ref.proc.returncode}):\n{ref.tail()}')
  reference_s = time.monotonic() - start
  step_time = _step_time(ref.workdir / 'metrics.jsonl', every)

  details, survived = [], 0
  workdir = root / 'killed'
  for i, kind in enumerate(_plan(rng, kills) + [None]):
    run = _Run.start(config_args, workdir, root / f'killed_{i}.log', env)
    if kind is None:
      code = run.wait(timeout)
      details.append(dict(kind='final', exit_code=code))
    else:
      details.append(_kill_once(run, kind, rng, num_steps, every, step_time, timeout))
      code = run.proc.returncode
    log = run.log.read_text()
    resumed = _RESUMED.search(log)
    details[-1]['started_from'] = int(resumed.group(1)) if resumed else 0
    if i > 0 and details[i - 1].get('killed'):
      # The kill before this process is survived if this one restored the latest committed step
      # (or started afresh when none was committed) and then trained or exited cleanly.
      expected = max(details[i - 1]['committed_after'], default=0)
      survived += details[-1]['started_from'] == expected and (
          details[-1].get('killed') or code == 0)
    if kind is None or not details[-1].get('killed'):
      if code != 0:
        raise RuntimeError(f'train.py exited {code} after {i} kills:\n{run.tail()}')
      break

  ref_step, ref_state = final_state(ref.workdir)
  end_step, end_state = final_state(workdir)
  identical, diff, differing = compare(ref_state, end_state)
  identical &= ref_step == end_step == num_steps
  return dict(kills=sum(bool(d.get('killed')) for d in details), kills_survived=int(survived),
              resumes_bit_identical=bool(identical), max_abs_diff=diff, differing=differing,
              compared=sorted(ref_state), steps=(ref_step, end_step),
              reference_s=round(reference_s, 1), step_time_s=round(step_time, 4),
              details=details)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', required=True, help='a new directory for the runs')
  parser.add_argument('--kills', type=int, default=5)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--task', choices=TASKS, default='spixnet')
  args = parser.parse_args()
  result = campaign(args.root, args.kills, args.seed, task=args.task)
  print(json.dumps(result, indent=2))
  sys.exit(0 if result['resumes_bit_identical'] else 1)


if __name__ == '__main__':
  sys.path.insert(0, str(REPO))
  main()
