"""Optimizer and learning-rate schedules of the official recipe, with Optax."""
import jax.numpy as jnp
import optax

SCHEDULES = ('linear_epoch', 'cosine_epoch', 'constant')


def learning_rate_schedule(optim_config, steps_per_epoch: int):
  """step -> learning rate. The official schedulers step once per epoch, so the rate is constant
  within an epoch e = step // steps_per_epoch:

    linear_epoch: lr (1 - (1 - final_factor) e / num_epochs), floored at lr * final_factor
    cosine_epoch: lr (1 + cos(pi e / num_epochs)) / 2   (CosineAnnealingLR, eta_min 0)
    constant:     lr

  With W = warmup_steps > 0 the schedule's value is scaled by min(1, step / W): a linear ramp from
  0 at step 0 to the schedule's own value at step W (as optax's warm-up schedules with init_value
  0), the schedule's epochs unshifted.
  """
  schedule = _epoch_schedule(optim_config, steps_per_epoch)
  # .get: runs saved before warm-up existed have no such field in their config.json.
  warmup = optim_config.get('warmup_steps', 0)
  if warmup <= 0:
    return schedule
  return lambda step: schedule(step) * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)


def _epoch_schedule(optim_config, steps_per_epoch: int):
  """The per-epoch schedule of `learning_rate_schedule`, without warm-up."""
  base, epochs = optim_config.learning_rate, optim_config.num_epochs
  kind = optim_config.schedule
  if kind not in SCHEDULES:
    raise ValueError(f'config.optim.schedule={kind!r} is not one of {SCHEDULES}')
  if kind == 'constant':
    return optax.constant_schedule(base)
  final = optim_config.final_factor

  def schedule(step):
    epoch = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    if kind == 'linear_epoch':
      return base * jnp.maximum(1.0 - (1.0 - final) * epoch / epochs, final)
    return base * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(epoch, epochs) / epochs))

  return schedule


def make_optimizer(optim_config, schedule, frozen=()):
  """Adam as torch's (coupled L2 weight decay), optional clipping; top-level modules in `frozen`
  get no update at all (their optimizer state is empty)."""
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  if optim_config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim_config.weight_decay))  # before Adam, as torch
  parts.append(optax.scale_by_adam(optim_config.b1, optim_config.b2, optim_config.eps))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if not frozen:
    return tx
  labels = lambda params: {k: 'frozen' if k in frozen else 'train' for k in params}
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
