import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax.ops import superpixel as sp

S = sp.STRIDE


def _random_assoc(rng, b, height, width):
  logits = rng.normal(size=(b, height, width, 9)) * 2
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)


def _naive_pool(feat, assoc):
  b, height, width, c = feat.shape
  h, w = height // S, width // S
  num = np.zeros((b, h, w, c))
  den = np.zeros((b, h, w))
  for y in range(height):
    for x in range(width):
      for k, (dy, dx) in enumerate(sp.OFFSETS):
        ty, tx = y // S + dy, x // S + dx
        if 0 <= ty < h and 0 <= tx < w:
          num[:, ty, tx] += assoc[:, y, x, k, None] * feat[:, y, x]
          den[:, ty, tx] += assoc[:, y, x, k]
  return num / (den[..., None] + 1e-8 * S * S), den / (S * S)


def _naive_diffuse(tokens, assoc):
  b, h, w, c = tokens.shape
  out = np.zeros((b, h * S, w * S, c))
  for y in range(h * S):
    for x in range(w * S):
      for k, (dy, dx) in enumerate(sp.OFFSETS):
        ty, tx = y // S + dy, x // S + dx
        if 0 <= ty < h and 0 <= tx < w:
          out[:, y, x] += assoc[:, y, x, k, None] * tokens[:, ty, tx]
  return out


def test_pool_and_diffuse_match_the_definition():
  rng = np.random.default_rng(0)
  assoc = _random_assoc(rng, 2, 32, 48)
  feat = rng.normal(size=(2, 32, 48, 3)).astype(np.float32)
  tokens, conf = sp.pool(jnp.asarray(feat), assoc)
  want_tokens, want_conf = _naive_pool(feat, np.asarray(assoc, np.float64))
  np.testing.assert_allclose(tokens, want_tokens, atol=1e-5)
  np.testing.assert_allclose(conf, want_conf, atol=1e-6)
  grid = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  np.testing.assert_allclose(sp.diffuse(jnp.asarray(grid), assoc),
                             _naive_diffuse(grid, np.asarray(assoc, np.float64)), atol=1e-5)


def test_pool_then_diffuse_keeps_a_constant_away_from_the_border():
  assoc = _random_assoc(np.random.default_rng(1), 1, 64, 80)
  const = jnp.full((1, 64, 80, 2), 0.37)
  out = sp.reconstruct(const, assoc)
  # Pixels whose 3x3 neighbour cells all exist: the second to second-last rows/cols of cells.
  np.testing.assert_allclose(out[:, S:-S, S:-S], 0.37, atol=1e-5)
  # At the border, mass pointing outside the grid is dropped: the constant is attenuated.
  assert float(jnp.min(out[:, 0, 0])) < 0.37 - 1e-3


def test_spixel_size_counts_hard_assigned_pixels():
  h, w = 2, 3
  k_center = 4
  assoc = np.zeros((1, h * S, w * S, 9), np.float32)
  assoc[..., k_center] = 1.0
  # Every pixel of cell (0, 0) votes for its right neighbour (channel 5) instead.
  assoc[0, :S, :S] = 0.0
  assoc[0, :S, :S, 5] = 1.0
  size = np.asarray(sp.spixel_size(jnp.asarray(assoc)))
  want = np.ones((1, h, w))
  want[0, 0, 0], want[0, 0, 1] = 0.0, 2.0
  np.testing.assert_allclose(size, want)
  # A tie counts for every tied channel, as the official argmax one-hot does.
  tied = np.full((1, S, S, 9), 1 / 9, np.float32)
  np.testing.assert_allclose(sp.spixel_size(jnp.asarray(tied)), [[[9 / 9 * 1.0]]])


@pytest.mark.parametrize('shape', [(1, 40, 48, 2), (1, 32, 20, 2)])
def test_sizes_not_multiple_of_16_raise(shape):
  with pytest.raises(ValueError, match='multiple of the superpixel stride 16'):
    sp.pool(jnp.zeros(shape), jnp.zeros(shape[:3] + (9,)))
