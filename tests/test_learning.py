"""Training makes the colorizer better: the tiny model on the demo photos, a fixed number of steps.

configs/disco.py:tiny (its random SPixNet frozen, as a stage-1 result would be) trains STEPS steps
of the real train step at learning rate LEARNING_RATE on the demo photos (the scikit-image colour
photos, 32 px random crops).
The validation pass (trainer.evaluate: ground-truth anchors, as the official validation, on the
squashed photos) must then show the two rebalanced cross-entropies (modeler + generator) down by
at least CE_DROP from step 0.
Seeds, batches and steps are fixed, so the figures are the same on every run of this code: a
broken gradient, optimizer or data path fails it (`learn(dir, 0.0)`, learning rate 0, fails it:
10.91 -> 10.79 nats). Almost all of its time is compiling the train and eval steps; the steps
take ~30 s.
"""
import jax
import pytest

from configs import disco as disco_configs
from disco_jax.data import pipeline
from disco_jax.training import optim, sharding, tasks, trainer

STEPS = 150
LEARNING_RATE = 3e-3  # 3 x the tiny config's: the margin below in 150 steps
# The margin is well inside the measured trajectories (bench/NOTES.md, "The learning test"), so
# that other device counts' float sums do not matter.
CE_DROP = 3.0  # nats, of the summed cross-entropies


def _config(data_dir, learning_rate):
  config = disco_configs.get_config('tiny')
  config.input.update(data_dir=str(data_dir), image_size=32, global_batch_size=8)
  config.optim.learning_rate = learning_rate
  config.eval.max_batches = -1  # the whole split: the 9 demo photos, one padded batch
  return config


def learn(data_dir, learning_rate):
  """(validation at step 0, validation after STEPS steps)."""
  config = _config(data_dir, learning_rate)
  task = tasks.DiscoTask(config)  # no stage-1 file: the SPixNet is random, and frozen
  schedule = optim.learning_rate_schedule(config.optim, pipeline.steps_per_epoch(config))
  tx = optim.make_optimizer(config.optim, schedule, frozen=task.frozen)
  mesh = sharding.make_mesh(1)
  batch_shard = sharding.batch_sharding(mesh)
  state = trainer.create_state(task, tx, config.seed)
  eval_step = jax.jit(trainer.make_eval_step(task, config.seed))
  before = trainer.evaluate(eval_step, state, config, batch_shard)
  step = jax.jit(trainer.make_train_step(task, tx, schedule, config.seed), donate_argnums=(0,))
  batches = pipeline.train_iterator(config, batch_shard)
  for _ in range(STEPS):
    state, metrics = step(state, next(batches))
  assert bool(metrics['finite'])
  after = trainer.evaluate(eval_step, state, config, batch_shard)
  return before, after


@pytest.fixture(scope='module')
def learned(tmp_path_factory):
  return learn(tmp_path_factory.mktemp('tfds'), LEARNING_RATE)


def test_validation_cross_entropy_falls(learned):
  before, after = learned
  ce = lambda v: v['val_ce_modeler'] + v['val_ce_generator']
  print(f'validation CE {ce(before):.3f} -> {ce(after):.3f}')
  assert ce(after) <= ce(before) - CE_DROP, (ce(before), ce(after))

