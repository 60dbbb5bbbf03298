import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from disco_jax.models import disco
from disco_jax.ops import colour
from disco_jax.training import losses

TINY = disco.DISCO(spix_width=4, backbone_width=8, refine_width=8, d_model=16, num_layers=2,
                   num_heads=2, ffn_dim=32, num_anchors=3)


def _inputs(b, height, width, seed=0):
  rgb = jax.random.uniform(jax.random.key(seed), (b, height, width, 3))
  gray, ab = colour.normalise_lab(colour.rgb_to_lab(rgb))
  return gray, ab


def test_released_parameter_count():
  shapes = jax.eval_shape(lambda: disco.init_variables(disco.DISCO()))
  params = shapes['params']
  assert disco.count_params(params) == 43_063_739
  per_module = {name: disco.count_params(params, name) for name in params}
  assert per_module == {'segnet': 2_269_497, 'repnet': 32_529_216, 'wildpath': 299_904,
                        'hintpath': 299_904, 'mid_word_prj': 20_032, 'trg_word_emb': 24_192,
                        'trg_word_prj': 20_032, 'enhanceNet': 7_600_962}
  # Table 1 of the supplementary: 5 layers per branch.
  five = jax.eval_shape(lambda: disco.init_variables(disco.DISCO(num_layers=5)))['params']
  assert disco.count_params(five, 'wildpath') == 5 * 49_984


@pytest.fixture(scope='module')
def tiny_variables():
  return disco.init_variables(TINY, 0)


def test_non_square_size_and_bad_size(tiny_variables):
  gray, ab = _inputs(2, 32, 48)
  out = TINY.apply(tiny_variables, gray, ab, test_mode=True, colours='mode',
                   rngs={'anchors': jax.random.key(1)})
  assert out['ab_pred'].shape == (2, 32, 48, 2)
  assert out['modeler_logits'].shape == (2, 2, 3, 313)
  assert np.all(np.abs(np.asarray(out['ab_pred'])) < 1)
  np.testing.assert_array_equal(out['anchor_mask'].sum((1, 2)), [3, 3])
  gray, ab = _inputs(1, 40, 48)
  with pytest.raises(ValueError, match='40x48 is not a positive multiple'):
    TINY.apply(tiny_variables, gray, ab, rngs={'anchors': jax.random.key(1)})


def test_anchor_modes(tiny_variables):
  gray, ab = _inputs(2, 64, 64)
  rngs = {'anchors': jax.random.key(3)}
  train = TINY.apply(tiny_variables, gray, ab, rngs=rngs)
  # Training anchors: GT colours, labels the nearest bin of each superpixel's mean GT ab.
  np.testing.assert_array_equal(train['anchor_label'], colour.nearest_bin(train['spix_ab']))
  auto = TINY.apply(tiny_variables, gray, ab, test_mode=True, colours='mode', rngs=rngs)
  np.testing.assert_array_equal(auto['anchor_label'], np.argmax(auto['modeler_logits'], -1))
  # The hint reaches the generator exactly at the anchors (labels elsewhere are ignored).
  mask = np.asarray(auto['anchor_mask'])[..., None]
  hint = np.asarray(jax.nn.one_hot(auto['anchor_label'], 313)) * mask
  w = np.asarray(tiny_variables['params']['trg_word_emb']['kernel'])
  want = np.concatenate([auto['tokens'], hint, mask], -1) @ w
  np.testing.assert_allclose(auto['hint_emb'], want, atol=1e-5)
  rand = TINY.clone(random_anchors=True)
  out = rand.apply(tiny_variables, gray, ab, rngs=rngs)
  np.testing.assert_array_equal(out['anchor_mask'].sum((1, 2)), [3, 3])
  with pytest.raises(ValueError, match='colours must be one of'):
    TINY.apply(tiny_variables, gray, ab, colours='sample', rngs=rngs)


def test_jit_forward_with_kmeans_on_a_4_device_mesh(tiny_variables):
  devices = jax.devices()
  assert len(devices) == 4, 'conftest sets jax_num_cpu_devices=4'
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  gray, ab = _inputs(4, 32, 32, seed=1)
  batch = NamedSharding(mesh, P('data'))
  fwd = jax.jit(functools.partial(TINY.apply, test_mode=True, colours='mode'))
  rngs = {'anchors': jax.random.key(5)}
  sharded = fwd(tiny_variables, jax.device_put(gray, batch), jax.device_put(ab, batch), rngs=rngs)
  assert sharded['ab_pred'].sharding.spec == P('data')
  single = TINY.apply(tiny_variables, gray, ab, test_mode=True, colours='mode', rngs=rngs)
  np.testing.assert_allclose(sharded['ab_pred'], single['ab_pred'], atol=1e-5)
  np.testing.assert_array_equal(sharded['anchor_mask'], single['anchor_mask'])


def _train_loss(m, params, state, gray, ab, rngs):
  out, updates = m.apply({'params': params, **state}, gray, ab, train=True, rngs=rngs,
                         mutable=['batch_stats', 'spectral'])
  w = jnp.asarray(colour.class_weights(0.5))
  loss = (losses.rebalanced_cross_entropy(out['modeler_logits'], out['anchor_label'], w)
          + losses.rebalanced_cross_entropy(out['generator_logits'], out['anchor_label'], w)
          + jnp.mean(jnp.abs(out['ab_pred'] - ab)))
  return loss, updates


def _check_training_gradients(m, variables, gray, ab):
  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}
  rngs = {'anchors': jax.random.key(1), 'dropout': jax.random.key(2)}
  grads, updates = jax.jit(jax.grad(functools.partial(_train_loss, m), has_aux=True))(
      params, state, gray, ab, rngs)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  assert all(np.all(np.isfinite(g)) for _, g in flat)
  norm = lambda name: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree_util.tree_leaves(grads[name])))
  for name in ('repnet', 'wildpath', 'hintpath', 'mid_word_prj', 'trg_word_emb', 'enhanceNet'):
    assert norm(name) > 0, f'no gradient reaches {name}'
  assert norm('segnet') == 0, 'SPixNet is frozen'
  # Training forwards run one power iteration: the stored vectors move.
  before = variables['spectral']['repnet']['conv2_3_2']['u']
  after = updates['spectral']['repnet']['conv2_3_2']['u']
  assert float(jnp.max(jnp.abs(after - before))) > 0
  assert 'segnet' not in updates['batch_stats'] or jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, updates['batch_stats']['segnet'], variables['batch_stats']['segnet']))


def test_training_gradients_tiny(tiny_variables):
  _check_training_gradients(TINY, tiny_variables, *_inputs(2, 32, 32))


def test_full_size_forward_backward_at_reduced_resolution():
  """The released configuration, one training step's gradient at 32x32 (a 2x2 token grid)."""
  released = disco.DISCO(num_anchors=2)  # a 2x2 grid has room for fewer than the default 8
  variables = disco.init_variables(released, 0)
  _check_training_gradients(released, variables, *_inputs(1, 32, 32))
