"""The trainer: one jitted, sharded train step, and the loop around it.

  state, batch -> state, metrics    (jax.jit over the ('data', 'fsdp') mesh, state donated)

The loop restores the latest checkpoint of the workdir if there is one (a rerun continues), feeds
global batches, logs progress and scalars, evaluates, draws sample grids, saves checkpoints, stops
cleanly on preemption and refuses to continue past a non-finite loss.
"""
import dataclasses
import json
import logging
import os
from typing import Any

from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from disco_jax import checkpoint as ckpt_lib
from disco_jax import compiled_stats
from disco_jax import input_pipeline, metrics as metrics_lib, optim, sharding, tasks, validate

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


def create_state(task, tx, seed):
  variables = task.init_variables(seed)
  params = variables.pop('params')
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                    opt_state=tx.init(params))


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def make_train_step(task, tx, schedule, seed, max_update_ratio=0.0):
  """The pure step. Randomness is fold_in(key(seed), step): independent of where a run resumed.

  A step whose loss, terms, gradient or update ratio are not finite, or (with `max_update_ratio`
  > 0) whose update is larger than `max_update_ratio` times the parameters' norm, changes nothing;
  its metrics `finite` and `update_ratio` say so and the host stops the run (`_Pending.flush`).
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
    # copied every parameter and Adam moment at the start of the step: 0.49 GB at 256x256, b2).
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
class _Pending:
  """Metrics of steps run since the last host check, still on device."""
  items: list = dataclasses.field(default_factory=list)
  max_update_ratio: float = 0.0  # config.optim.max_update_ratio; 0 = no divergence check

  def flush(self):
    """Fetch, check for non-finite values and divergence, and return the mean of each scalar."""
    if not self.items:
      return {}
    fetched = [(step, _fetch(m)) for step, m in self.items]
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
  sums, count = {}, 0.0
  for batch in input_pipeline.eval_batches(config, batch_shard,
                                           max_batches=config.eval.max_batches
                                           if config.eval.max_batches > 0 else None):
    s, n = _fetch(eval_step(state, batch))
    count += float(n)
    for k, v in s.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {f'val_{k}': v / max(count, 1.0) for k, v in sums.items()}


def _write_config(config, workdir):
  # epath: the workdir may be a gs:// bucket (see README, "Running on a TPU pod").
  path = epath.Path(workdir) / 'config.json'
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(config.to_json_best_effort(indent=2))
  tmp.replace(path)


def _fetch(tree):
  """Host copies of jit outputs that are replicated over the mesh. `jax.device_get` refuses arrays
  spanning other processes' devices; each process holds a full copy of a replicated one."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _with_nan(batch, batch_shard):
  """Test hook (config.debug.nan_at_step): `batch` with a NaN in the first pixel of its first
  input image, as a corrupt record or a fault upstream would bring."""
  poison = lambda b: {**b, 'gray': b['gray'].at[0, 0, 0, 0].set(jnp.nan)}
  return jax.jit(poison, out_shardings=batch_shard)(batch)


def _save_pictures(writer, picture_fn, task, state, batch, step):
  arrays = _fetch(picture_fn(state.params, state.model_state, batch))
  writer.write_images(step, {'samples': metrics_lib.image_grid(task.picture_rows(arrays))})


def train_and_evaluate(config, workdir: str):
  """Trains as `config` says, in `workdir`; returns the last logged scalars.

  Rerunning with the same workdir continues from its latest checkpoint.
  """
  validate.validate_config(config)
  is_main = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  batch_shard = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  task = tasks.make_task(config)
  if config.task == 'disco' and config.loss.perceptual_weight == 0:
    logging.warning(
        'config.loss.perceptual_weight is 0: no VGG19 perceptual term (the released recipe uses '
        '5, with weights from a local file: see README, "VGG19 for the perceptual loss")%s',
        f'; the RefineNet trains on an ab L1 term of weight {config.loss.ab_l1_weight} instead'
        if config.loss.ab_l1_weight > 0 else
        '; nothing trains the RefineNet (set config.loss.ab_l1_weight to give it a signal)')
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  total_steps = (config.optim.num_steps if config.optim.num_steps > 0
                 else config.optim.num_epochs * steps_per_epoch)
  schedule = optim.learning_rate_schedule(config.optim, steps_per_epoch)
  tx = optim.make_optimizer(config.optim, schedule, frozen=task.frozen)

  # Sharded from birth: shapes first, then a jitted init that writes each shard in place.
  abstract = jax.eval_shape(lambda: create_state(task, tx, config.seed))
  state_shard = sharding.tree_shardings(mesh, abstract)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.ckpt.keep,
                                       save_every=config.ckpt.every_steps)
  start = checkpointer.latest_step()
  if start is None:
    state = jax.jit(lambda: create_state(task, tx, config.seed), out_shardings=state_shard)()
    start = 0
  else:
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shard)
    state, _ = checkpointer.restore(target)
    start = int(_fetch(state.step))
    logging.info('resuming from the checkpoint at step %d in %s', start, workdir)
  if is_main:
    # Written after the restore: a run refused by the checkpoint (another model) leaves the
    # config of the run that wrote it, which eval.py and a rerun rely on.
    _write_config(config, workdir)
    logging.info('parameters:\n%s', metrics_lib.param_overview(state.params))
    logging.info('mesh %s over %d devices (%d processes); %d steps per epoch, %d steps in all',
                 dict(mesh.shape), jax.device_count(), jax.process_count(), steps_per_epoch,
                 total_steps)

  train_step = jax.jit(make_train_step(task, tx, schedule, config.seed,
                                       config.optim.max_update_ratio),
                       in_shardings=(state_shard, batch_shard),
                       out_shardings=(state_shard, replicated),
                       donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(task, config.seed), out_shardings=replicated)
  num_pictures = min(config.log.num_images, config.input.global_batch_size)
  picture_fn = jax.jit(lambda p, s, b: task.picture_arrays(p, s, b, num_pictures),
                       out_shardings=replicated)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(total_steps, start)
  pending = _Pending(max_update_ratio=config.optim.max_update_ratio)
  batches = input_pipeline.train_iterator(config, batch_shard, start_step=start)
  scalars = {}
  every = lambda n, s: n > 0 and s % n == 0
  preemption = ckpt_lib.PreemptionNotice(checkpointer)
  compiled_step = None
  try:
    # Reports the first step to the preemption service of a multi-process run before compiling:
    # a notice that comes before any process reported a step sets the stop at step 1, which a
    # resumed run has passed, so it would train on until killed.
    if preemption.reached(start):
      raise Preempted(f'preempted at step {start}, before training went on; rerun the same '
                      'command to resume')
    for step in range(start, total_steps):
      batch = next(batches)
      if step + 1 == config.debug.nan_at_step:  # a test hook, off (-1) in real runs
        batch = _with_nan(batch, batch_shard)
      if compiled_step is None:
        # Compiled ahead of the first call so that XLA's own account of the step is logged.
        compiled_step = train_step.lower(state, batch).compile()
        if is_main:
          logging.info('train step compiled (per device): %s',
                       compiled_stats.describe(compiled_stats.compiled_stats(compiled_step)))
        compiled_stats.release_freed_memory()
      state, m = compiled_step(state, batch)
      pending.items.append((step, m))
      done = step + 1
      last = done == total_steps
      if every(config.log.every_steps, done) or last or every(config.ckpt.every_steps, done):
        scalars = pending.flush()
        scalars['images_per_s'] = progress.throughput(done, config.input.global_batch_size)
        if progress.seconds_per_step is not None:
          scalars['step_time_s'] = progress.seconds_per_step
        writer.write_scalars(done, scalars)
        if is_main:
          logging.info(progress.line(done, scalars, config.input.global_batch_size))
      if every(config.eval.every_steps, done) or last:
        val = evaluate(eval_step, state, config, batch_shard)
        writer.write_scalars(done, val)
        scalars.update(val)
        if is_main:
          logging.info('step %d validation: %s', done,
                       ' '.join(f'{k} {v:.4f}' for k, v in val.items()))
      if every(config.log.images_every_steps, done) or last:
        _save_pictures(writer, picture_fn, task, state, batch, done)
      saved = False
      if every(config.ckpt.every_steps, done) or last:
        pending.flush()
        checkpointer.save(done, state, force=last, metrics={'val_loss': scalars['val_loss']}
                          if 'val_loss' in scalars else None)
        saved = True
      if not last and preemption.reached(done):
        pending.flush()
        if not saved:
          checkpointer.save(done, state, force=True)
        checkpointer.wait()
        raise Preempted(f'preempted at step {done}: checkpoint saved; rerun the same command '
                        'to resume')
  finally:
    preemption.close()
    checkpointer.wait()
    writer.close()
  if config.task == 'spixnet':
    variables = {'params': {'segnet': state.params},
                 'batch_stats': {'segnet': state.model_state['batch_stats']}}
    # Every process takes part in gathering FSDP shards; process 0 writes the file.
    whole = _fetch(jax.jit(lambda v: v, out_shardings=replicated)(variables))
    if is_main:
      tasks.convert.save_variables(os.path.join(workdir, tasks.SPIXNET_EXPORT), whole)
      logging.info('stage 1 done: SPixNet weights for stage 2 in %s',
                   os.path.join(workdir, tasks.SPIXNET_EXPORT))
  return scalars


def restore_trained(workdir: str, step=None, best: bool = False):
  """(config, TrainState) of a training run: the config it saved and a whole checkpoint.

  Restores the latest checkpoint that can be read (or `step`, or with `best` the one of lowest
  validation loss) onto all local devices, replicated; `state.step` says which step it was.
  """
  path = epath.Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: {workdir} is not a training workdir of train.py')
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  # The frozen inputs (SPixNet file, VGG19) live in the checkpoint or are not needed to evaluate.
  task = tasks.SpixTask(config) if config.task == 'spixnet' else tasks.DiscoTask(config)
  tx = optim.make_optimizer(config.optim, optim.learning_rate_schedule(config.optim, 1),
                            frozen=task.frozen)
  abstract = jax.eval_shape(lambda: create_state(task, tx, config.seed))
  mesh = sharding.make_mesh(1)
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
