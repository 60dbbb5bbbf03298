import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax.models import vgg
from disco_jax.ops import colour
from disco_jax.training import losses


def test_rebalanced_ce_has_the_official_gradient():
  """The official loss is plain CE whose logits' gradient is scaled by w[label] per token."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 3, 313)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 313, (2, 3, 3)), jnp.int32)
  w = jnp.asarray(colour.class_weights(0.5))
  grad = jax.grad(losses.rebalanced_cross_entropy)(logits, labels, w)
  # d CE_t / d logits_t = softmax - onehot; the mean over 18 tokens divides by 18.
  plain = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, 313)) / 18
  np.testing.assert_allclose(grad, plain * w[labels][..., None], atol=1e-7)
  value = losses.rebalanced_cross_entropy(logits, labels, w)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(value, jnp.mean(w[labels] * ce), rtol=1e-6)
  # No gradient flows into the weights.
  assert float(jnp.abs(jax.grad(losses.rebalanced_cross_entropy, 2)(logits, labels, w)).sum()) == 0


def test_spixel_loss_terms():
  height = width = 32
  centre = np.zeros((1, height, width, 9), np.float32)
  centre[..., 4] = 1.0  # every pixel fully in its own cell: reconstruction = per-cell means
  ab = np.zeros((1, height, width, 2), np.float32)
  ab[:, :16, :16] = 0.5  # constant per cell: the colour term vanishes
  loss = losses.spixel_loss(jnp.asarray(centre), jnp.asarray(ab))
  # Each pixel is replaced by its cell's centre (7.5, 7.5) + offset: mean |dxy| over a 16x16 cell.
  d = np.arange(16) - 7.5
  mean_norm = np.mean(np.sqrt(d[:, None] ** 2 + d[None, :] ** 2))
  np.testing.assert_allclose(loss, 0.003 * mean_norm / 16, rtol=1e-5)
  # The colour term counts 10x the mean L2 error of ab.
  ab2 = ab.copy()
  ab2[:, :8, :16] = 0.3  # cell mean 0.4 in both channels: every pixel off by 0.1 in each
  loss2 = losses.spixel_loss(jnp.asarray(centre), jnp.asarray(ab2))
  np.testing.assert_allclose(loss2 - loss, 10 * 0.1 * np.sqrt(2) / 4, rtol=1e-4)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, height, width, 9)), jnp.float32)
  g = jax.grad(lambda l: losses.spixel_loss(jax.nn.softmax(l), jnp.asarray(ab2)))(logits)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


def _random_vgg_params():
  shapes = jax.eval_shape(lambda: vgg.VGG19Features().init(jax.random.key(0),
                                                           jnp.zeros((1, 32, 32, 3))))['params']
  keys = iter(jax.random.split(jax.random.key(1), 64))
  return jax.tree_util.tree_map(lambda s: 0.05 * jax.random.normal(next(keys), s.shape), shapes)


def test_disco_loss_terms_and_missing_vgg():
  rng = np.random.default_rng(2)
  gray = jnp.asarray(rng.uniform(-1, 1, (1, 32, 32, 1)), jnp.float32)
  ab = jnp.asarray(rng.uniform(-0.5, 0.5, (1, 32, 32, 2)), jnp.float32)
  outputs = {'anchor_label': colour.nearest_bin(ab[:, ::16, ::16]),
             'modeler_logits': jnp.zeros((1, 2, 2, 313)),
             'generator_logits': jnp.zeros((1, 2, 2, 313)), 'ab_pred': ab * 0.5}
  w = jnp.asarray(colour.class_weights(0.5))
  total, terms = losses.disco_loss(outputs, gray, ab, w, perceptual_weight=0.0)
  assert set(terms) == {'ce_modeler', 'ce_generator'}
  np.testing.assert_allclose(terms['ce_modeler'], np.log(313) * np.mean(w[outputs['anchor_label']]),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='download.pytorch.org'):
    losses.disco_loss(outputs, gray, ab, w)
  params = _random_vgg_params()
  total5, terms5 = losses.disco_loss(outputs, gray, ab, w, params, 'torch', perceptual_weight=5.0)
  perceptual = losses.perceptual_loss(params, 'torch', gray, outputs['ab_pred'], ab)
  np.testing.assert_allclose(terms5['perceptual'], 5 * perceptual, rtol=1e-6)
  np.testing.assert_allclose(total5, total + 5 * perceptual, rtol=1e-6)
  assert float(perceptual) > 0
