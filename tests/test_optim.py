import ml_collections
import numpy as np
import optax
import pytest
import jax.numpy as jnp

from configs import spixnet as spixnet_configs
from disco_jax.training import optim, validate


def _config(**kw):
  c = ml_collections.ConfigDict(dict(learning_rate=2e-4, b1=0.9, b2=0.999, eps=1e-8,
                                     weight_decay=0.0, schedule='linear_epoch', final_factor=0.01,
                                     num_epochs=60, grad_clip_norm=0.0))
  c.update(kw)
  return c


def test_linear_per_epoch_schedule_is_the_papers_formula():
  spe = 7
  schedule = optim.learning_rate_schedule(_config(), spe)
  for step in (0, 6, 7, 13, 14, 200, 419, 420 - 1):
    epoch = step // spe
    np.testing.assert_allclose(schedule(step), 2e-4 * (1 - 0.99 * epoch / 60), rtol=1e-6)
  np.testing.assert_allclose(schedule(59 * spe), 2e-4 * (1 - 0.99 * 59 / 60), rtol=1e-6)  # ~5.3e-6
  np.testing.assert_allclose(schedule(60 * spe + 3), 2e-6, rtol=1e-6)  # the floor, after the end


def test_cosine_per_epoch_and_constant():
  schedule = optim.learning_rate_schedule(_config(schedule='cosine_epoch'), 10)
  np.testing.assert_allclose(schedule(9), 2e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(300), 1e-4, rtol=1e-5)  # epoch 30 of 60
  np.testing.assert_allclose(optim.learning_rate_schedule(_config(schedule='constant'), 10)(999),
                             2e-4)
  with pytest.raises(ValueError, match="config.optim.schedule='step'"):
    optim.learning_rate_schedule(_config(schedule='step'), 10)


def test_frozen_modules_never_move_and_adam_matches_optax():
  params = {'segnet': {'w': jnp.ones(3)}, 'repnet': {'w': jnp.ones(3)}}
  grads = {'segnet': {'w': jnp.full(3, 0.5)}, 'repnet': {'w': jnp.full(3, 0.5)}}
  schedule = optim.learning_rate_schedule(_config(schedule='constant'), 1)
  tx = optim.make_optimizer(_config(), schedule, frozen=('segnet',))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['segnet']['w'], 0.0)
  ref, _ = optax.adam(2e-4).update(grads['repnet'], optax.adam(2e-4).init(params['repnet']))
  np.testing.assert_allclose(updates['repnet']['w'], ref['w'], rtol=1e-6)


@pytest.mark.parametrize('kind', ['linear_epoch', 'constant'])
def test_warmup_scales_the_schedule_by_step_over_warmup_steps(kind):
  spe, warmup = 7, 20
  plain = optim.learning_rate_schedule(_config(schedule=kind), spe)
  warm = optim.learning_rate_schedule(_config(schedule=kind, warmup_steps=warmup), spe)
  for step in (0, 1, 6, 7, 13, 19, 20, 21, 100):
    # float32 schedule arithmetic: a few ulps.
    np.testing.assert_allclose(warm(step), plain(step) * min(1.0, step / warmup), rtol=1e-6,
                               atol=0)
  assert float(warm(0)) == 0.0
  at_10 = {'linear_epoch': 2e-4 * (1 - 0.99 * 1 / 60), 'constant': 2e-4}[kind]  # epoch 1
  np.testing.assert_allclose(warm(10), 0.5 * at_10, rtol=1e-6)
  assert optim.learning_rate_schedule(_config(schedule=kind, warmup_steps=0), spe)(0) == plain(0)


def test_bad_warmup_steps_are_named():
  config = spixnet_configs.get_config('tiny')
  config.input.dataset = 'demo'
  config.optim.warmup_steps = -1
  with pytest.raises(validate.ConfigError, match=r'config.optim.warmup_steps=-1: must be >= 0'):
    validate.validate_config(config)
