"""The trainer: one jitted, sharded train step, and the loop around it.

  state, batch -> state, metrics    (jax.jit over the ('data', 'fsdp') mesh, state donated)

The loop restores the latest checkpoint of the workdir if there is one (a rerun continues), feeds
global batches and runs its periodic actions after each step: progress line and scalars,
validation, sample grids, checkpoints, the preemption check. It refuses to continue past a
non-finite loss. What a stage computes and leaves behind is its task's (`training.tasks`).
"""
import dataclasses
import json
import logging
import os
from typing import Any, Callable

from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from disco_jax.data import pipeline
from disco_jax.models import disco
from disco_jax.training import checkpoint as ckpt_lib
from disco_jax.training import compiled_stats, optim, sharding, tasks, validate, writers

PREEMPTED_EXIT_CODE = 42


class Preempted(Exception):
  """Training stopped on a preemption notice after saving a checkpoint."""


class NonFiniteLoss(FloatingPointError):
  """A loss term or the gradient became NaN or infinite."""


class Diverged(FloatingPointError):
  """One update would have moved the parameters by more than config.optim.max_update_ratio."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # () int32: completed steps
  params: Any
  model_state: Any  # {'batch_stats': ..., 'spectral': ...}: non-trainable variables
  opt_state: Any


def create_state(task, tx, seed, imported=None):
  """Step 0: the task's initial variables (with `imported`'s arrays in place of theirs, see
  `tasks.overlay`) and a fresh optimizer state."""
  variables = task.init_variables(seed)
  if imported is not None:
    variables = tasks.overlay(variables, imported)
  params = variables.pop('params')
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                    opt_state=tx.init(params))


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def make_train_step(task, tx, schedule, seed, max_update_ratio=0.0):
  """The pure step. Randomness is fold_in(key(seed), step): independent of where a run resumed.

  A step whose loss, terms, gradient or update ratio are not finite, or (with `max_update_ratio`
  > 0) whose update is larger than `max_update_ratio` times the parameters' norm, changes nothing;
  its metrics `finite` and `update_ratio` say so and the host stops the run
  (`PendingMetrics.flush`).
  """
  base_key = jax.random.key(seed)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    (loss, (terms, new_model_state, _)), grads = grad_fn(
        state.params, state.model_state, batch, rng, True)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Adam moves each parameter by about lr whatever its gradient, so a diverging run can keep a
    # finite, even falling, loss (at lr 1e6 the tiny SPixNet's gradients vanish after one step):
    # the update's size relative to the parameters shows it.
    update_ratio = optax.tree.norm(updates) / optax.tree.norm(state.params)
    # `finite` covers the update ratio too, so `ok` depends on it even with the divergence check
    # off: that dependency is what lets XLA update the donated state in place (without it, XLA
    # copied every parameter and Adam moment at the start of the step; bench/NOTES.md).
    finite = (jnp.isfinite(loss) & _all_finite(terms) & _all_finite(grads)
              & jnp.isfinite(update_ratio))
    # A bad step changes nothing: the host stops the run at its next check, and the state that
    # may then be saved is the last good one.
    ok = finite if max_update_ratio <= 0 else finite & (update_ratio <= max_update_ratio)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           model_state=keep(new_model_state, state.model_state),
                           opt_state=keep(opt_state, state.opt_state))
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads), update_ratio=update_ratio,
                   lr=schedule(state.step), finite=finite)
    return new_state, metrics

  return train_step


def make_eval_step(task, seed):
  """Masked sums of the per-example loss terms over a padded batch."""
  key = jax.random.key(seed + 1)

  def eval_step(state, batch):
    terms = task.eval_terms(state.params, state.model_state, batch, key)
    terms['loss'] = sum(terms.values())
    mask = batch['mask'].astype(jnp.float32)
    return {k: jnp.sum(v * mask) for k, v in terms.items()}, jnp.sum(mask)

  return eval_step


@dataclasses.dataclass
class PendingMetrics:
  """Metrics of steps run since the last host check, still on device."""
  items: list = dataclasses.field(default_factory=list)
  max_update_ratio: float = 0.0  # config.optim.max_update_ratio; 0 = no divergence check

  def flush(self):
    """Fetch, check for non-finite values and divergence, and return the mean of each scalar."""
    if not self.items:
      return {}
    fetched = [(step, sharding.fetch(m)) for step, m in self.items]
    self.items = []
    for step, m in fetched:
      if not m['finite']:
        bad = [k for k, v in m.items() if k != 'finite' and not np.isfinite(v)] or ['gradient']
        raise NonFiniteLoss(f'non-finite value at step {step + 1}: {", ".join(bad)} '
                            f'({", ".join(f"{k}={m[k]}" for k in bad if k in m)}); '
                            'the state of that step was not applied and not saved')
      if 0 < self.max_update_ratio < m['update_ratio']:
        raise Diverged(f'training diverged at step {step + 1}: its update would have moved the '
                       f'parameters by {m["update_ratio"]:.3g} times their norm (more than '
                       f'config.optim.max_update_ratio={self.max_update_ratio:g}; loss '
                       f'{m["loss"]:.4g}, lr {m["lr"]:.3g}); the state of that step was not '
                       'applied and not saved: lower config.optim.learning_rate')
    keys = [k for k in fetched[0][1] if k != 'finite']
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in keys}


def evaluate(eval_step, state, config, batch_shard):
  """Mean validation loss terms over `config.eval.max_batches` batches (-1: the whole split)."""
  sums, count = {}, 0.0
  max_batches = config.eval.max_batches if config.eval.max_batches > 0 else None
  for batch in pipeline.eval_batches(config, batch_shard, max_batches=max_batches):
    s, n = sharding.fetch(eval_step(state, batch))
    count += float(n)
    for k, v in s.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {f'val_{k}': v / max(count, 1.0) for k, v in sums.items()}


def write_config(config, workdir):
  """`workdir/config.json`, written atomically: what eval.py and a rerun read back."""
  # epath: the workdir may be a gs:// bucket (see README, "Running on a TPU pod").
  path = epath.Path(workdir) / 'config.json'
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(config.to_json_best_effort(indent=2))
  tmp.replace(path)


def _with_nan(batch, batch_shard):
  """Test hook (config.debug.nan_at_step): `batch` with a NaN in the first pixel of its first
  input image, as a corrupt record or a fault upstream would bring."""
  poison = lambda b: {**b, 'gray': b['gray'].at[0, 0, 0, 0].set(jnp.nan)}
  return jax.jit(poison, out_shardings=batch_shard)(batch)


@dataclasses.dataclass
class Run:
  """Everything a training run is made of once set up: mesh, task, optimizer, state, checkpoints."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  task: Any
  schedule: Callable
  tx: optax.GradientTransformation
  state_shard: Any
  checkpointer: ckpt_lib.Checkpointer
  state: TrainState
  start: int  # the step the state is at
  steps_per_epoch: int
  total_steps: int

  @property
  def batch_shard(self):
    return sharding.batch_sharding(self.mesh)

  @property
  def replicated(self):
    return sharding.replicated(self.mesh)


def set_up(config, workdir: str) -> Run:
  """Mesh, task, schedule and state of a run: restored from the workdir's latest checkpoint if it
  has one, else created sharded from birth (shapes first, then a jitted init that writes each
  shard in place)."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  task = tasks.make_task(config, mesh.devices.flat)
  steps_per_epoch = pipeline.steps_per_epoch(config)  # prepares the dataset where needed (logged)
  total_steps = (config.optim.num_steps if config.optim.num_steps > 0
                 else config.optim.num_epochs * steps_per_epoch)
  schedule = optim.learning_rate_schedule(config.optim, steps_per_epoch)
  tx = optim.make_optimizer(config.optim, schedule, frozen=task.frozen)
  abstract = jax.eval_shape(lambda: create_state(task, tx, config.seed))
  state_shard = sharding.tree_shardings(mesh, abstract)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.ckpt.keep,
                                       save_every=config.ckpt.every_steps)
  if checkpointer.latest_step() is None:
    imported = task.imported_variables(config.init_from) if config.init_from else None
    if imported is not None:
      logging.info('a new run from the weights of config.init_from=%s (%d arrays, %s parameters '
                   'replaced): fresh optimizer state, step 0', config.init_from,
                   len(jax.tree_util.tree_leaves(imported)),
                   f'{disco.count_params(imported.get("params", {})):,}')
    # The imported arrays are arguments, not constants baked into the compiled init.
    state = jax.jit(lambda v: create_state(task, tx, config.seed, v),
                    out_shardings=state_shard)(imported)
  else:
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shard)
    state, _ = checkpointer.restore(target)
    step = int(sharding.fetch(state.step))
    logging.info('resuming from the checkpoint at step %d in %s', step, workdir)
    if config.init_from:
      logging.info('config.init_from=%s ignored: this run continues from its own checkpoint at '
                   'step %d', config.init_from, step)
  return Run(config, workdir, mesh, task, schedule, tx, state_shard, checkpointer, state,
             int(sharding.fetch(state.step)), steps_per_epoch, total_steps)


def _log_start(run: Run):
  config = run.config
  task_name = config.task
  if task_name == 'disco' and config.loss.perceptual_weight == 0:
    logging.warning(
        'config.loss.perceptual_weight is 0: no VGG19 perceptual term (the released recipe uses '
        '5, with weights from a local file: see README, "VGG19 for the perceptual loss")%s',
        f'; the RefineNet trains on an ab L1 term of weight {config.loss.ab_l1_weight} instead'
        if config.loss.ab_l1_weight > 0 else
        '; nothing trains the RefineNet (set config.loss.ab_l1_weight to give it a signal)')
  logging.info('parameters:\n%s', writers.param_overview(run.state.params))
  logging.info('mesh %s over %d devices (%d processes); %d steps per epoch, %d steps in all',
               dict(run.mesh.shape), jax.device_count(), jax.process_count(),
               run.steps_per_epoch, run.total_steps)


@dataclasses.dataclass
class Periodic:
  """`action(step)` after every step that is a multiple of one of `every` (0: never) and after
  the last step, as clu's periodic actions run."""
  every: tuple
  action: Callable[[int], None]

  def __call__(self, step: int, last: bool):
    if last or any(n > 0 and step % n == 0 for n in self.every):
      self.action(step)


class _Loop:
  """The training loop's periodic actions over one run, and what they share."""

  def __init__(self, run: Run, writer, preemption):
    config, task = run.config, run.task
    self.run, self.writer, self.preemption = run, writer, preemption
    self.is_main = jax.process_index() == 0
    self.state, self.batch, self.scalars, self.saved = run.state, None, {}, False
    self.pending = PendingMetrics(max_update_ratio=config.optim.max_update_ratio)
    self.progress = writers.Progress(run.total_steps, run.start)
    self.eval_step = jax.jit(make_eval_step(task, config.seed), out_shardings=run.replicated)
    num_pictures = min(config.log.num_images, config.input.global_batch_size)
    self.picture_fn = jax.jit(lambda p, s, b: task.picture_arrays(p, s, b, num_pictures),
                              out_shardings=run.replicated)
    self.actions = [
        Periodic((config.log.every_steps, config.ckpt.every_steps), self.log),
        Periodic((config.eval.every_steps,), self.validate),
        Periodic((config.log.images_every_steps,), self.pictures),
        Periodic((config.ckpt.every_steps,), self.checkpoint),
    ]

  def after_step(self, step: int, state, batch, metrics):
    self.state, self.batch, self.saved = state, batch, False
    self.pending.items.append((step - 1, metrics))
    last = step == self.run.total_steps
    for action in self.actions:
      action(step, last)
    if not last:
      self.check_preemption(step)

  def log(self, step):
    batch_size = self.run.config.input.global_batch_size
    self.scalars = self.pending.flush()
    self.scalars['images_per_s'] = self.progress.throughput(step, batch_size)
    if self.progress.seconds_per_step is not None:
      self.scalars['step_time_s'] = self.progress.seconds_per_step
    self.writer.write_scalars(step, self.scalars)
    if self.is_main:
      logging.info(self.progress.line(step, self.scalars, batch_size))

  def validate(self, step):
    val = evaluate(self.eval_step, self.state, self.run.config, self.run.batch_shard)
    self.writer.write_scalars(step, val)
    self.scalars.update(val)
    if self.is_main:
      logging.info('step %d validation: %s', step, ' '.join(f'{k} {v:.4f}' for k, v in val.items()))

  def pictures(self, step):
    state, task = self.state, self.run.task
    arrays = sharding.fetch(self.picture_fn(state.params, state.model_state, self.batch))
    self.writer.write_images(step, {'samples': writers.image_grid(task.picture_rows(arrays))})

  def checkpoint(self, step):
    self.pending.flush()
    metrics = {'val_loss': self.scalars['val_loss']} if 'val_loss' in self.scalars else None
    self.run.checkpointer.save(step, self.state, force=step == self.run.total_steps,
                               metrics=metrics)
    self.saved = True

  def check_preemption(self, step):
    if self.preemption.reached(step):
      self.pending.flush()
      if not self.saved:
        self.run.checkpointer.save(step, self.state, force=True)
      self.run.checkpointer.wait()
      raise Preempted(f'preempted at step {step}: checkpoint saved; rerun the same command to '
                      'resume')


def _compile(train_step, state, batch, is_main):
  """Compiled ahead of the first call, so that XLA's own account of the step is logged."""
  compiled = train_step.lower(state, batch).compile()
  if is_main:
    logging.info('train step compiled (per device): %s',
                 compiled_stats.describe(compiled_stats.compiled_stats(compiled)))
  compiled_stats.release_freed_memory()
  return compiled


def train_and_evaluate(config, workdir: str):
  """Trains as `config` says, in `workdir`; returns the last logged scalars.

  Rerunning with the same workdir continues from its latest checkpoint.
  """
  validate.validate_config(config)
  run = set_up(config, workdir)
  if jax.process_index() == 0:
    # Written after the restore: a run refused by the checkpoint (another model) leaves the
    # config of the run that wrote it, which eval.py and a rerun rely on.
    write_config(config, workdir)
    _log_start(run)
  train_step = jax.jit(make_train_step(run.task, run.tx, run.schedule, config.seed,
                                       config.optim.max_update_ratio),
                       in_shardings=(run.state_shard, run.batch_shard),
                       out_shardings=(run.state_shard, run.replicated), donate_argnums=(0,))
  batches = pipeline.train_iterator(config, run.batch_shard, start_step=run.start)
  writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  preemption = ckpt_lib.PreemptionNotice(run.checkpointer)
  loop, state, compiled_step = _Loop(run, writer, preemption), run.state, None
  try:
    # Reports the first step to the preemption service of a multi-process run before compiling:
    # a notice that comes before any process reported a step sets the stop at step 1, which a
    # resumed run has passed, so it would train on until killed.
    if preemption.reached(run.start):
      raise Preempted(f'preempted at step {run.start}, before training went on; rerun the same '
                      'command to resume')
    for step in range(run.start, run.total_steps):
      batch = next(batches)
      if step + 1 == config.debug.nan_at_step:  # a test hook, off (-1) in real runs
        batch = _with_nan(batch, run.batch_shard)
      compiled_step = compiled_step or _compile(train_step, state, batch, loop.is_main)
      state, metrics = compiled_step(state, batch)
      loop.after_step(step + 1, state, batch, metrics)
  finally:
    preemption.close()
    run.checkpointer.wait()
    writer.close()
  run.task.export(state, workdir, run.mesh)
  return loop.scalars


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir/config.json`.

  A folder holding the two stages' runs (README: `spixnet/` and `disco/`) is named as such, with the
  subfolder to pass instead.
  """
  root = epath.Path(workdir)
  path = root / 'config.json'
  if not path.is_file():
    stages = [d for d in ('disco', 'spixnet') if (root / d / 'config.json').is_file()]
    if stages:
      raise FileNotFoundError(
          f'{workdir} holds the training runs {", ".join(f"{d}/" for d in stages)}, not one run: '
          f'pass --workdir {root / stages[0]}' + (' (the colorizer, stage 2)'
                                                  if stages[0] == 'disco' else ''))
    raise FileNotFoundError(f'{path} not found: {workdir} is not a training workdir of train.py')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_trained(workdir: str, step=None, best: bool = False, config=None):
  """(config, TrainState) of a training run: the config it saved and a whole checkpoint.

  Restores the latest checkpoint that can be read (or `step`, or with `best` the one of lowest
  validation loss) onto all local devices, replicated; `state.step` says which step it was.
  `config`: the saved config with fields changed (eval.py's --config.x=y); its model must be the
  run's.
  """
  config = load_config(workdir) if config is None else config
  # The frozen inputs (SPixNet file, VGG19) live in the checkpoint or are not needed to evaluate.
  mesh = sharding.make_mesh(1)
  cpu_kernels = tasks.uses_cpu_kernels(config, mesh.devices.flat)
  task = (tasks.SpixTask(config, cpu_kernels) if config.task == 'spixnet'
          else tasks.DiscoTask(config, cpu_kernels=cpu_kernels,
                               platform=mesh.devices.flat[0].platform))
  tx = optim.make_optimizer(config.optim, optim.learning_rate_schedule(config.optim, 1),
                            frozen=task.frozen)
  abstract = jax.eval_shape(lambda: create_state(task, tx, config.seed))
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
      abstract)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  if best:
    step = checkpointer.best_step()
    if step is None:
      raise FileNotFoundError(f'{workdir}: no checkpoint with a validation loss to pick the best')
  state, _ = checkpointer.restore(target, step)
  return config, state


def load_trained(workdir: str, step=None, best: bool = False):
  """(config, variables) of a training run: `restore_trained`'s config and model variables.

  `variables` = {'params', 'batch_stats'[, 'spectral']}, ready for `model.apply`; the optimizer
  state is read (the checkpoint holds it) and dropped.
  """
  config, state = restore_trained(workdir, step, best)
  return config, {'params': state.params, **state.model_state}
