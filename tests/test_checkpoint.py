"""Checkpointer: round trips, resharding, retention, atomicity, damage and mismatch handling."""
import logging
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from disco_jax.training import checkpoint


@flax.struct.dataclass
class _State:  # the trainer's TrainState, in small
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ('data',))


def _make_state(seed=0, width=64, sharding=None):
  """A small train state. The leading axis of `w` (8) splits over 1, 2 or 4 devices; `w` is
  big enough (2 KiB) to get its own data file rather than be inlined in the index."""
  rng = np.random.default_rng(seed)
  params = {'enc': {'w': jnp.asarray(rng.normal(size=(8, width)), jnp.float32),
                    'b': jnp.asarray(rng.normal(size=(width,)), jnp.bfloat16)},
            'head': [jnp.asarray(rng.normal(size=(3,)), jnp.float32)]}
  state = _State(step=jnp.asarray(seed, jnp.int32), params=params,
                 model_state={'batch_stats': {'mean': jnp.asarray(rng.normal(size=(width,)))}},
                 opt_state=optax.adam(1e-3).init(params))
  if sharding is not None:
    state = jax.device_put(state, sharding(state))
  return state


def _sharded_over(n):
  """Shardings splitting axis 0 over `n` devices where it divides, replicated elsewhere."""
  mesh = _mesh(n)

  def rule(state):
    return jax.tree.map(lambda x: NamedSharding(mesh, P('data') if x.ndim and x.shape[0] % n == 0
                                                else P()), state)
  return rule


def _target(state, sharding_rule):
  shardings = sharding_rule(state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _assert_identical(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _saved(directory, steps, **kwargs):
  """A closed directory with `steps` saved (state seeded by the step) and their val losses."""
  ckpt = checkpoint.Checkpointer(directory, **{'keep': 10, **kwargs})
  for step, loss in steps.items():
    assert ckpt.save(step, _make_state(step), extra={'step': step},
                     metrics=None if loss is None else {'val_loss': loss})
  ckpt.close()


def test_round_trip_is_bit_identical_with_extra(tmp_path):
  state = _make_state(3)
  extra = {'epoch': 2, 'name': 'disco', 'nested': {'xs': [1, 2.5]}}
  expected = jax.tree.map(np.array, state)  # copies: the arrays are deleted below
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  assert ckpt.save(7, state, extra=extra, metrics={'val_loss': np.float32(1.5)})
  # The train step donates the state right after saving: the save must not need it any more.
  target = _target(state, _sharded_over(1))
  jax.tree.map(lambda x: x.delete(), state)
  ckpt.wait()
  restored, got_extra = ckpt.restore(target)
  _assert_identical(restored, expected)
  assert isinstance(restored, _State)
  assert got_extra == extra
  assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7 and ckpt.best_step() == 7
  ckpt.close()


@pytest.mark.parametrize('written_by,read_by', [(4, 1), (1, 4), (4, 2)])
def test_restore_onto_another_device_count(tmp_path, written_by, read_by):
  state = _make_state(1, sharding=_sharded_over(written_by))
  assert len(state.params['enc']['w'].sharding.device_set) == written_by
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
  ckpt.save(1, state)
  ckpt.close()
  target = _target(_make_state(0), _sharded_over(read_by))
  restored, _ = checkpoint.Checkpointer(tmp_path, keep=1).restore(target)
  _assert_identical(restored, state)
  w = restored.params['enc']['w']
  assert w.sharding == target.params['enc']['w'].sharding
  assert len(w.sharding.device_set) == read_by
  assert w.addressable_shards[0].data.shape == (8 // read_by, 64)


def test_keeps_latest_n_plus_best(tmp_path):
  losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.5, 6: 2.6}
  _saved(tmp_path, losses, keep=2)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  assert ckpt.all_steps() == [2, 5, 6]
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
  assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '5', '6']


def test_keep_best_off_keeps_latest_only_and_steps_without_loss_never_rank_best(tmp_path):
  _saved(tmp_path, {1: 1.0, 2: None, 3: float('nan')}, keep=2, keep_best=False)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, keep_best=False)
  assert ckpt.all_steps() == [2, 3]
  assert ckpt.best_step() is None  # neither kept step has a finite validation loss


def test_save_every_skips_off_grid_steps_unless_forced(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, save_every=10)
  state = _make_state()
  assert ckpt.save(5, state)  # the first save of a directory is always written
  assert ckpt.save(10, state)
  assert not ckpt.save(15, state)
  assert ckpt.save(17, state, force=True)
  assert not ckpt.save(17, state, force=True)  # already saved: never overwritten
  ckpt.close()
  assert checkpoint.Checkpointer(tmp_path, keep=5).all_steps() == [5, 10, 17]


def test_uncommitted_tmp_dir_is_not_a_step(tmp_path):
  _saved(tmp_path, {1: None, 2: None})
  # What a run killed mid-save leaves: a complete-looking folder under the tmp name.
  shutil.copytree(tmp_path / '2', tmp_path / '3.orbax-checkpoint-tmp')
  ckpt = checkpoint.Checkpointer(tmp_path, keep=10)
  assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
  _, extra = ckpt.restore(_make_state(0))
  assert extra == {'step': 2}
  # Saving that step again replaces the stale tmp folder.
  assert ckpt.save(3, _make_state(3))
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2', '3']


def _truncate_a_data_file(step_dir):
  data = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  biggest = max(data, key=lambda p: p.stat().st_size)
  with open(biggest, 'r+b') as f:
    f.truncate(biggest.stat().st_size // 2)


def _delete_a_file(step_dir):
  os.remove(step_dir / 'state' / 'manifest.ocdbt')


def _garble_the_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').write_text('{"tree_metadata": {"params.enc.w": ')


# TensorStore leaves un-awaited reads behind when a file is bad: harmless, but pytest reports them.
_UNAWAITED = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@_UNAWAITED
@pytest.mark.parametrize('damage,problem', [(_truncate_a_data_file, 'OUT_OF_RANGE'),
                                            (_delete_a_file, 'NOT_FOUND'),
                                            (_garble_the_metadata, 'JSONDecodeError')])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, damage, problem):
  _saved(tmp_path, {1: None, 2: None, 3: None})
  damage(tmp_path / '3')
  ckpt = checkpoint.Checkpointer(tmp_path, keep=10)
  with caplog.at_level(logging.WARNING):
    restored, extra = ckpt.restore(_target(_make_state(), _sharded_over(1)))
  _assert_identical(restored, _make_state(2))
  assert extra == {'step': 2}
  warning = next(r.getMessage() for r in caplog.records
                 if r.levelno == logging.WARNING and 'checkpoint step 3' in r.getMessage())
  assert problem in warning and str(tmp_path) in warning
  # The damaged step is kept aside, no longer a step, so training can save step 3 again.
  assert ckpt.all_steps() == [1, 2]
  assert [p.name.startswith('3.damaged-') for p in tmp_path.iterdir()].count(True) == 1
  assert ckpt.save(3, _make_state(3))
  ckpt.close()


@_UNAWAITED
def test_every_step_damaged_names_the_directory(tmp_path):
  _saved(tmp_path, {1: None, 2: None})
  for step in (1, 2):
    _delete_a_file(tmp_path / str(step))
  ckpt = checkpoint.Checkpointer(tmp_path, keep=10)
  with pytest.raises(checkpoint.DamagedCheckpointError, match=str(tmp_path)):
    ckpt.restore(_make_state())


@_UNAWAITED
def test_explicit_step_does_not_fall_back(tmp_path):
  _saved(tmp_path, {1: None, 2: None})
  _garble_the_metadata(tmp_path / '2')
  ckpt = checkpoint.Checkpointer(tmp_path, keep=10)
  with pytest.raises(checkpoint.DamagedCheckpointError, match='checkpoint step 2'):
    ckpt.restore(_make_state(), step=2)
  _, extra = ckpt.restore(_make_state(), step=1)
  assert extra == {'step': 1}
  with pytest.raises(FileNotFoundError, match='step 5'):
    ckpt.restore(_make_state(), step=5)


def test_other_model_is_refused_with_the_paths(tmp_path):
  _saved(tmp_path, {1: None})
  wider = _make_state(width=48)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=10)
  with pytest.raises(ValueError,
                     match=r'params/enc/w: \(8, 64\) in the checkpoint, \(8, 48\)') as e:
    ckpt.restore(wider)
  assert 'opt_state/0/mu/enc/b' in str(e.value)
  extra_leaf = _make_state().replace(model_state={'batch_stats': {'mean': jnp.zeros(64),
                                                                  'var': jnp.ones(64)}})
  with pytest.raises(ValueError, match='model_state/batch_stats/var: missing from the checkpoint'):
    ckpt.restore(extra_leaf)


def test_empty_directory_and_bad_arguments(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / 'none', keep=1)
  assert ckpt.latest_step() is None and ckpt.best_step() is None and ckpt.all_steps() == []
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    ckpt.restore(_make_state())
  with pytest.raises(ValueError, match='no sharding'):
    ckpt.restore({'w': jax.ShapeDtypeStruct((2,), jnp.float32)})
  with pytest.raises(TypeError, match='JSON'):
    ckpt.save(1, _make_state(), extra={'bad': object()})
  with pytest.raises(ValueError, match='config.ckpt.keep'):
    checkpoint.Checkpointer(tmp_path, keep=0)
  assert not ckpt.reached_preemption(1)
