"""Checkpoints for the trainer: a thin, defensive layer over Orbax's `CheckpointManager`.

  ckpt = Checkpointer(directory, keep=3, keep_best=True, save_every=1000)
  ckpt.save(step, state, extra={...}, metrics={'val_loss': x})   # async; returns at once
  state, extra = ckpt.restore(target)                            # onto target's shardings
  notice = PreemptionNotice(ckpt); notice.reached(step)          # after SIGTERM: save and stop

What a step looks like on disk (Orbax's layout): `<directory>/<step>/` holding `state/` (the
arrays, OCDBT + zarr, plus `_METADATA` with every array's path, shape and dtype), `meta/metadata`
(the `extra` JSON) and `metrics/metrics` (the metrics JSON, used to rank checkpoints).

Guarantees, and where they come from:
- Atomic steps (Orbax): a save is written into `<step>.orbax-checkpoint-tmp` and renamed to
  `<step>` once every file is written, so a run killed mid-save leaves a tmp folder that no step
  listing sees; it is removed when that step is saved again.
- Keep the latest `keep` plus the best by validation loss (an Orbax preservation policy).
- Any mesh to any mesh: arrays are restored straight onto the target's shardings, whatever device
  count wrote them.
- Damage: restoring the latest step falls back to older ones when files are missing, truncated
  or garbled, with a warning naming the step and the problem, and moves the damaged steps aside
  (`<step>.damaged-<time>`) so that training can save those steps again.
- A checkpoint of a different model (other shapes or parameter paths) is refused before any array
  is read, with the mismatched paths listed.
"""
import json
import logging
import os
import math
import re
import signal
import sys
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

_STATE = 'state'  # the arrays: the train state pytree
_META = 'meta'  # the caller's small JSON dict, given back with the state
_MAX_LISTED = 20  # mismatched paths shown in an error before "... and N more"


class DamagedCheckpointError(RuntimeError):
  """A checkpoint step (or every step) of a directory cannot be read back."""


class IncompatibleCheckpointError(ValueError):
  """A checkpoint holds another model (other shapes or parameter paths) than the one restoring."""


def _val_loss(metrics) -> float:
  """Rank of a checkpoint for Orbax, lower is better: its validation loss, +inf without one.

  Every save passes a metrics dict (`{}` when no validation loss is known): Orbax warns on each
  save without metrics once a `best_fn` is set, and an empty dict ranks last instead.
  """
  return metrics.get('val_loss', math.inf)


def _clean_metrics(metrics, step) -> dict:
  """`metrics` as plain JSON floats; non-finite values are dropped so they can never rank best."""
  clean = {}
  for name, value in (metrics or {}).items():
    try:
      value = float(value)
    except (TypeError, ValueError) as e:
      raise ValueError(f'checkpoint metrics at step {step}: {name!r}={value!r} is not a number; '
                       'pass scalars such as {"val_loss": 1.23}') from e
    if math.isfinite(value):
      clean[name] = value
    else:
      logging.warning('checkpoint at step %d: metric %s=%s is not finite, so this checkpoint is '
                      'saved without it and cannot become the best', step, name, value)
  return clean


def _reason(error) -> str:
  """One line for a read error: its innermost cause, which names the file and what is wrong
  (the outer ones wrap it with a dump of the TensorStore spec)."""
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if inner is None:
      break
    error = inner
  lines = str(error).split(' [tensorstore_spec', 1)[0].splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


def quiet_abandoned_reads():
  """Drops, for the rest of the process, the leftovers of restores that fail part-way.

  When one array of a step cannot be read, Orbax stops waiting and closes its event loop while
  TensorStore completes the step's other reads: their callbacks raise 'Event loop is closed', and
  the abandoned read coroutines are collected with the read error inside. Python prints each as a
  traceback through sys.unraisablehook, dozens of them, at any later moment (often at exit), after
  the one warning that matters: a fallback that worked, or a clean error, would read like a crash.
  asyncio logs the abandoned tasks' and futures' errors too; those records are dropped when the
  error was raised in Orbax's code or set by TensorStore's C++ code. Any other unraisable exception
  goes to the previous hook, any other log record through.

  Called before every restore, not once one has failed: the callbacks run on TensorStore's threads
  and can print while the read error is still on its way up to the caller.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'quiets_abandoned_reads', False):
    return
  orbax_dir = os.path.dirname(ocp.__file__)

  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    closed_loop = (obj is None and isinstance(exc, RuntimeError)
                   and str(exc) == 'Event loop is closed')
    code = getattr(obj, 'cr_code', None)  # an abandoned coroutine of Orbax's reading code
    if not (closed_loop or (code is not None and code.co_filename.startswith(orbax_dir))):
      previous(unraisable)

  hook.quiets_abandoned_reads = True
  sys.unraisablehook = hook

  def raised_in_orbax(exc):
    while exc is not None:
      tb = exc.__traceback__
      while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(orbax_dir):
          return True
        tb = tb.tb_next
      exc = exc.__cause__ or exc.__context__
    return False

  def from_tensorstore(exc):
    # TensorStore sets its read errors on futures from C++: no Python frame at all, and an absl
    # status code first ('FAILED_PRECONDITION: Error reading ...').
    return exc.__traceback__ is None and re.match(r'[A-Z_]+: ', str(exc)) is not None

  def not_abandoned(record):
    # '<class name> exception was never retrieved': Task, Future, _GatheringFuture...
    abandoned = str(record.msg).split('\n', 1)[0].endswith(' exception was never retrieved')
    exc = record.exc_info[1] if record.exc_info else None
    return not (abandoned and exc is not None and (raised_in_orbax(exc) or from_tensorstore(exc)))

  logging.getLogger('asyncio').addFilter(not_abandoned)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _abstract(target):
  """ShapeDtypeStructs with the target's shardings: what Orbax restores onto."""

  def one(path, x):
    sharding = getattr(x, 'sharding', None)
    if sharding is None:
      raise ValueError(f'restore target leaf {_path_str(path)!r} has no sharding; pass jax arrays '
                       'or jax.ShapeDtypeStruct(shape, dtype, sharding=...) so that the '
                       'checkpoint lands on the current mesh')
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(one, target)


def _shape_mismatches(saved, wanted) -> list[str]:
  """Human-readable lines for every path whose shape differs or that only one tree has.

  Dtypes may differ on purpose (Orbax casts on restore, e.g. float32 -> bfloat16), shapes may not.
  """
  shapes = lambda tree: {_path_str(path): tuple(leaf.shape)
                         for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  saved, wanted = shapes(saved), shapes(wanted)
  lines = []
  for path in sorted(saved.keys() | wanted.keys()):
    if path not in saved:
      lines.append(f'{path}: missing from the checkpoint (the model wants {wanted[path]})')
    elif path not in wanted:
      lines.append(f'{path}: {saved[path]} in the checkpoint, not in the model')
    elif saved[path] != wanted[path]:
      lines.append(f'{path}: {saved[path]} in the checkpoint, {wanted[path]} in the model')
  return lines


class Checkpointer:
  """Async, atomic checkpoints of a train state: the latest `keep` plus the best by `val_loss`.

  Every process of a multi-process run must build one and make the same calls (Orbax syncs them).
  """

  def __init__(self, directory, keep: int = 3, keep_best: bool = True, save_every: int = 1):
    """`directory`: where steps live (created); `keep`: latest checkpoints kept (config.ckpt.keep);
    `keep_best`: also keep the lowest `val_loss` one; `save_every`: `save` writes only on multiples
    of this (config.ckpt.every_steps), except when forced, when the directory has no step yet and
    once a preemption notice arrived."""
    if keep < 1:
      raise ValueError(f'Checkpointer: keep={keep} must be at least 1 (config.ckpt.keep)')
    if save_every < 1:
      raise ValueError(f'Checkpointer: save_every={save_every} must be at least 1 '
                       '(config.ckpt.every_steps)')
    policy = ocm.LatestN(n=keep)
    if keep_best:
      # Orbax's `best_fn` + `max_to_keep` keeps the best N *instead of* the latest N; a preservation
      # policy keeps a step when any member wants it. Steps without a metrics file (none of ours)
      # are left to LatestN rather than kept forever.
      policy = ocm.AnyPreservationPolicy([
          policy,
          ocm.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                    keep_checkpoints_without_metrics=False),
      ])
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        preservation_policy=policy,
        # best_fn makes Orbax write each step's metrics and lets best_step() rank them;
        # retention is the policy's alone.
        best_fn=_val_loss,
        best_mode='min',
        enable_async_checkpointing=True,
        # Not cleanup_tmp_directories: a second reader of this directory (an eval job) would
        # delete the trainer's in-flight save. Stale tmp folders are ignored, then overwritten.
    )
    # Handlers up front so that metadata of existing steps can be read before any save or restore.
    # Orbax's tensorstore paths must be absolute; a workdir given relative to the cwd is fine.
    # URLs (gs://bucket/...) stay as they are.
    directory = os.fspath(directory)
    if '://' not in directory:
      directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()})
    self._set_asides = 0  # makes each set-aside barrier name unique

  @property
  def directory(self):
    return self._manager.directory

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (tmp folders of unfinished saves are not steps)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the lowest validation loss; None when no kept step has one."""
    step = self._manager.best_step()
    if step is None or not math.isfinite(_val_loss(self._manager.metrics(step) or {})):
      return None
    return step

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice (SIGTERM) arrived: save and stop now.

    Only with jax.distributed (see `PreemptionNotice`, which the trainer uses); False otherwise.
    """
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, extra: dict | None = None, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Start writing `state` (a pytree of jax arrays, sharded or not) and return at once.

    `extra`: JSON-serialisable dict given back by `restore`. `metrics`: e.g. `{'val_loss': x}`;
    the lowest `val_loss` is kept as the best. Returns whether a save started: False off the
    `save_every` grid (unless `force`) and when `step` is already saved (e.g. a resumed run that
    ends at once), which is never overwritten. The arrays are copied off-device before this
    returns, so `state` may be donated to the next step right away.
    """
    if step in self._manager.all_steps():
      logging.info('checkpoint step %d already exists in %s; not saving it again', step,
                   self.directory)
      return False
    extra = {} if extra is None else extra
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      # Checked here: Orbax writes JSON in the background, where the error would surface late.
      raise TypeError(f'checkpoint extra at step {step} is not JSON-serialisable ({e}); pass '
                      'plain dicts, lists, strings and Python numbers') from e
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _META: ocp.args.JsonSave(extra)})
    return self._manager.save(step, args=args, metrics=_clean_metrics(metrics, step), force=force)

  def wait(self):
    """Block until the in-flight save is committed (call before reading files or exiting)."""
    self._manager.wait_until_finished()

  def close(self):
    """Wait for the in-flight save, then release Orbax's threads."""
    self._manager.close()

  def restore(self, target, step: int | None = None) -> tuple[Any, dict]:
    """Restore `step` (default: the latest good one) onto `target`'s shardings.

    Args:
      target: pytree of jax arrays or `jax.ShapeDtypeStruct(..., sharding=...)` with the
        structure, shapes and shardings wanted (e.g. from `jax.eval_shape` + the sharding rules);
        dtypes may differ from the saved ones (values are cast).
      step: a specific step, or None for the latest that can be read.

    Returns:
      (state, extra): `state` shaped like `target`, `extra` the dict given to `save`.

    Raises:
      FileNotFoundError: no step in the directory.
      IncompatibleCheckpointError (a ValueError): the checkpoint holds other shapes or paths
        than `target` (another model); nothing is read and the steps are left as they are.
      DamagedCheckpointError: `step` cannot be read, or (step=None) no step can.
    """
    abstract = _abstract(target)
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f'no checkpoint step {step} in {self.directory} (it has {steps})')
      return self._read(step, abstract)
    damaged = []
    for candidate in reversed(steps):
      try:
        restored = self._read(candidate, abstract)
      except DamagedCheckpointError as e:
        logging.warning('%s; falling back to the previous checkpoint', e)
        damaged.append(candidate)
        continue
      if damaged:
        self._set_aside(damaged)
      return restored
    raise DamagedCheckpointError(
        f'no checkpoint in {self.directory} can be restored: steps {sorted(damaged)} are all '
        'damaged (see the warnings above); move them out of the directory to start afresh')

  def _read(self, step, abstract):
    """(state, extra) of one step; DamagedCheckpointError if its files are unreadable."""
    where = f'checkpoint step {step} in {self.directory}'
    quiet_abandoned_reads()
    # Orbax and TensorStore raise many types for unreadable files (ValueError, JSONDecodeError,
    # KeyError, plain Exception), so any error while reading counts as damage.
    try:
      # Reads `_METADATA` and every array's zarr header, not the array data.
      saved = self._manager.metadata(step).item_metadata[_STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f'{where} is damaged: its metadata cannot be read ({_reason(e)})') from e
    if saved is None:
      raise DamagedCheckpointError(f'{where} is damaged: state/_METADATA is missing')
    # Outside the try: another model's checkpoint is the caller's mistake, not damage.
    mismatches = _shape_mismatches(saved, abstract)
    if mismatches:
      shown = mismatches[:_MAX_LISTED]
      if len(mismatches) > _MAX_LISTED:
        shown.append(f'... and {len(mismatches) - _MAX_LISTED} more')
      raise IncompatibleCheckpointError(
          f'{where} does not fit the model ({len(mismatches)} mismatched paths):\n  '
          + '\n  '.join(shown) + '\nrestore with the config that wrote it, or use a fresh workdir')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f'{where} is damaged: its files cannot be read ({_reason(e)})') from e
    return restored[_STATE], restored[_META]

  def _set_aside(self, steps):
    """Rename damaged steps to `<step>.damaged-<time>`: kept for inspection, no longer steps.

    Without this, a damaged latest step would stay "latest": Orbax would skip every save up to it
    and refuse to write that step again.
    """
    if jax.process_index() == 0:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for step in steps:
        # Our manager uses Orbax's default step names: the bare step number.
        src = self.directory / str(step)
        dst = self.directory / f'{step}.damaged-{stamp}'
        src.rename(dst)
        logging.warning('moved the damaged checkpoint %s to %s', src, dst)
    self._set_asides += 1
    ocp.multihost.sync_global_processes(f'disco_checkpoint_set_aside_{self._set_asides}')
    self._manager.reload()


class PreemptionNotice:
  """Whether a preemption notice (SIGTERM) asks training to save and stop at this step.

    notice = PreemptionNotice(checkpointer)
    try:
      for step in ...:       # every step, on every process, with rising steps
        if notice.reached(step): save, stop
    finally:
      notice.close()

  The processes of a multi-process run must stop at the same step, or the collective save
  deadlocks. There jax.distributed's preemption service catches SIGTERM on any process and makes
  every process stop at the step after the highest one any of them had reached (Orbax's
  `reached_preemption`). A process started without jax.distributed has no such service: Orbax
  never reports a preemption and SIGTERM would kill it mid-step, so this class catches SIGTERM
  itself and reports it at the next step; `close` puts the previous handler back.
  """

  def __init__(self, checkpointer: Checkpointer):
    self._checkpointer = checkpointer
    self._received = False
    self._own = not jax.distributed.is_initialized()  # whether SIGTERM is ours to catch
    if self._own and threading.current_thread() is not threading.main_thread():
      # Python lets only the main thread set signal handlers.
      logging.warning('training runs outside the main thread: SIGTERM is not caught, so a '
                      'preemption kills it without a checkpoint')
      self._own = False
    if self._own:
      # getsignal is None for a handler set outside Python; SIG_DFL is then the best restore.
      self._previous = signal.getsignal(signal.SIGTERM)
      signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._received = True

  def reached(self, step: int) -> bool:
    """True when training should save `step` and stop: the same step on every process."""
    if self._own:
      return self._received
    return self._checkpointer.reached_preemption(step)

  def close(self):
    """Put the previous SIGTERM handler back (no-op where the service catches SIGTERM)."""
    if self._own:
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if self._previous is None else self._previous)
      self._own = False
