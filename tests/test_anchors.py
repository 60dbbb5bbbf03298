"""Anchor location (k-means, random) and anchor colours, against numpy recomputations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax.ops import anchors


def np_kmeans(x, init_idx, max_iters, tol):
  """The official loop in numpy, for data where no cluster goes empty.

  Returns labels, centres and the centre shift of every iteration run.
  """
  centres = x[init_idx].copy()
  shifts = []
  while True:
    labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    prev = centres.copy()
    for j in range(len(centres)):
      members = x[labels == j]
      assert len(members), 'the numpy reference does not re-seed empty clusters'
      centres[j] = members.mean(0)
    shifts.append(np.sqrt(((centres - prev) ** 2).sum(1)).sum())
    if shifts[-1] ** 2 < tol or len(shifts) >= max_iters:
      return labels, centres, shifts


def blobs(rng, k, per, dim=2, spread=0.3, gap=10.0):
  """k tight, far apart clusters: tokens (k * per, dim) in a shuffled order, and true ids."""
  centres = rng.normal(size=(k, dim)) * gap + gap * np.eye(k, dim)
  truth = rng.permutation(np.repeat(np.arange(k), per))
  return (centres[truth] + spread * rng.normal(size=(k * per, dim))).astype(np.float32), truth


def init_idx(key, num_tokens, k):
  """The initial centre indices that anchors.kmeans(key, ...) starts from."""
  return np.asarray(anchors.kmeans_init(jax.random.split(key)[0], num_tokens, k))


@functools.partial(jax.jit, static_argnums=(2, 3))
def kmeans_many(keys, xs, k, max_iters=20, tol=1e-4):
  """anchors.kmeans over a stack of keys, images `(n, L, D)` and tolerances (scalar or `(n,)`),
  compiled once per (k, max_iters)."""
  tols = jnp.broadcast_to(tol, keys.shape)
  return jax.vmap(lambda key, x, t: anchors.kmeans(key, x, k, max_iters, t))(keys, xs, tols)


# Compiled once and shared by the tests that use the same shapes.
kmeans_anchors_jit = jax.jit(anchors.kmeans_anchors, static_argnums=3)
kmeans_labels_jit = jax.jit(anchors.kmeans_labels, static_argnums=2)


def test_kmeans_init_draws_distinct_tokens_and_rejects_too_many():
  idx = np.asarray(anchors.kmeans_init(jax.random.key(0), 10, 10))
  assert idx.dtype == np.int32 and sorted(idx) == list(range(10))
  with pytest.raises(ValueError, match='k=5'):
    anchors.kmeans(jax.random.key(0), jnp.zeros((4, 2)), 5)


def test_kmeans_matches_numpy_loop_including_stop_rule():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(4, 48, 3)).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), 4)
  inits = [init_idx(key, 48, 4) for key in keys]
  # A tolerance per image between s^2 and s for the first shift s < 1: the squared rule stops right
  # there, an unsquared one would run on. Earlier shifts are >= 1, so neither rule stops before.
  tailored = []
  for x, init in zip(xs, inits):
    s = next(s for s in np_kmeans(x, init, 20, 0.0)[2] if s < 1)
    tailored.append((s ** 2 + s) / 2)
  stopped_by_tol = stopped_by_cap_with_stale_labels = 0
  for max_iters, tol in [(1, 1e-4), (2, 1e-4), (20, 1e-4), (20, 0.05), (20, np.array(tailored))]:
    labels, centres = kmeans_many(keys, jnp.asarray(xs), 4, max_iters, tol)
    for i, (x, init) in enumerate(zip(xs, inits)):
      want_labels, want_centres, shifts = np_kmeans(x, init, max_iters, np.broadcast_to(tol, 4)[i])
      np.testing.assert_array_equal(labels[i], want_labels)
      np.testing.assert_allclose(centres[i], want_centres, atol=1e-5)
      stopped_by_tol += len(shifts) < max_iters
      # Stopped by the cap before converging, the labels are not the assignment to the final centres.
      reassigned = ((x[:, None] - want_centres[None]) ** 2).sum(-1).argmin(1)
      stopped_by_cap_with_stale_labels += len(shifts) == max_iters and (reassigned != want_labels).any()
  # The cases above must exercise both exits for the comparison to mean anything.
  assert stopped_by_tol and stopped_by_cap_with_stale_labels


def test_kmeans_recovers_separated_clusters_in_a_few_iterations():
  rng = np.random.default_rng(1)
  x, truth = blobs(rng, 3, 20)
  keys = jax.random.split(jax.random.key(1), 40)
  labels, _ = kmeans_many(keys, jnp.broadcast_to(jnp.asarray(x), (40,) + x.shape), 3, 2)
  checked = 0
  for key, lab in zip(keys, np.asarray(labels)):
    # Random init (as official) can put two seeds in one blob and settle in a local minimum; the
    # claim is only for inits that hit every blob.
    if len(set(truth[init_idx(key, 60, 3)])) < 3:
      continue
    pairs = set(zip(truth, lab))
    assert len(pairs) == 3 and len({l for _, l in pairs}) == 3, pairs
    checked += 1
  assert checked >= 3


def test_kmeans_anchors_one_largest_superpixel_per_cluster():
  rng = np.random.default_rng(2)
  batch, h, w, k = 3, 6, 6, 3
  feats = np.stack([blobs(rng, k, h * w // k, dim=4)[0] for _ in range(batch)]).reshape(batch, h, w, 4)
  sizes = rng.uniform(0.2, 2.0, size=(batch, h, w)).astype(np.float32)
  key = jax.random.key(3)
  mask = np.asarray(kmeans_anchors_jit(key, jnp.asarray(feats), jnp.asarray(sizes), k))
  labels = np.asarray(kmeans_labels_jit(key, jnp.asarray(feats), k))
  assert mask.shape == (batch, h, w) and mask.dtype == np.float32
  for b in range(batch):
    lab, size = labels[b].ravel(), sizes[b].ravel()
    assert sorted(set(lab)) == list(range(k))  # well separated: no empty cluster
    want = np.zeros(h * w, np.float32)
    for j in range(k):
      members = np.flatnonzero(lab == j)
      want[members[np.argmax(size[members])]] = 1.0
    np.testing.assert_array_equal(mask[b].ravel(), want)
    assert mask[b].sum() == k


def test_select_anchors_ties_and_empty_cluster():
  labels = jnp.array([0, 1, 0, 1, 1, 0], jnp.int32)
  # Cluster 0 ties between tokens 0 and 2 -> token 0; cluster 1 -> token 4; cluster 2 is empty and
  # falls back to the global maximum, token 4, which is already cluster 1's anchor.
  sizes = jnp.array([1.0, 1.5, 1.0, 1.2, 3.0, 0.5])
  np.testing.assert_array_equal(anchors.select_anchors(labels, sizes, 3), [1, 0, 0, 0, 2, 0])
  # Membership outweighs size: a small member beats a bigger non-member.
  np.testing.assert_array_equal(anchors.select_anchors(labels, sizes, 2), [1, 0, 0, 0, 1, 0])


def test_kmeans_empty_cluster_is_reseeded_without_nan():
  # Half the tokens coincide at 0. When both initial centres land there, every token ties or is
  # nearer to centre 0, so cluster 1 is empty after the first assignment and must take a random token.
  x = np.r_[np.zeros(8), np.arange(1, 9)].astype(np.float32)[:, None]  # (16, 1)
  keys = jax.random.split(jax.random.key(0), 60)
  labels, centres = kmeans_many(keys, jnp.broadcast_to(jnp.asarray(x), (60, 16, 1)), 2, 1)
  reseeded = []
  for key, lab, cen in zip(keys, np.asarray(labels), np.asarray(centres)):
    if not (init_idx(key, 16, 2) < 8).all():
      continue
    np.testing.assert_array_equal(lab, 0)
    np.testing.assert_allclose(cen[0, 0], x.mean())
    assert cen[1, 0] in x[:, 0]
    reseeded.append(cen[1, 0])
  assert len(reseeded) >= 3 and max(reseeded) > 0  # not merely the old centre kept
  # Degenerate data through the full loop: everything stays finite and in range.
  degenerate = jnp.stack([jnp.zeros((12, 3)), jnp.repeat(jnp.eye(3), 4, axis=0)])
  labels, centres = kmeans_many(jax.random.split(jax.random.key(1), 2), degenerate, 5, 20)
  assert np.isfinite(centres).all() and ((labels >= 0) & (labels < 5)).all()


def test_kmeans_anchors_jit_vmap_matches_per_image_and_is_seeded():
  rng = np.random.default_rng(4)
  easy = blobs(rng, 3, 12, dim=4, spread=0.01)[0]
  feats = np.stack([easy, rng.normal(size=(36, 4)), rng.normal(size=(36, 4))]).astype(np.float32)
  key = jax.random.key(5)
  image_keys = jax.random.split(key, 3)
  # The images stop after different iteration counts, so the batched loop must leave finished
  # images untouched while the others go on.
  iters = [len(np_kmeans(x, init_idx(k, 36, 3), 20, 1e-4)[2]) for x, k in zip(feats, image_keys)]
  assert len(set(iters)) > 1, iters
  feats = jnp.asarray(feats.reshape(3, 6, 6, 4))
  sizes = jnp.asarray(rng.uniform(0.5, 1.5, size=(3, 6, 6)).astype(np.float32))
  mask, labels = kmeans_anchors_jit(key, feats, sizes, 3), kmeans_labels_jit(key, feats, 3)
  one_image = jax.jit(anchors.kmeans, static_argnums=2)
  for b, image_key in enumerate(image_keys):
    want, _ = one_image(image_key, feats[b].reshape(36, 4), 3)
    np.testing.assert_array_equal(labels[b].ravel(), want)
    np.testing.assert_array_equal(mask[b].ravel(), anchors.select_anchors(want, sizes[b].ravel(), 3))
  np.testing.assert_array_equal(kmeans_anchors_jit(key, feats, sizes, 3), mask)
  other = jax.random.key(6)
  assert (init_idx(image_keys[1], 36, 3) != init_idx(jax.random.split(other, 3)[1], 36, 3)).any()
  assert (kmeans_labels_jit(other, feats, 3) != labels).any()
  # A loss through the centres differentiates (to zero) instead of failing on the while_loop.
  grad = jax.grad(lambda x: jnp.sum(anchors.kmeans(key, x, 3)[1]))(feats[0].reshape(36, 4))
  np.testing.assert_array_equal(grad, 0)


def test_random_anchors_k_distinct_positions():
  mask = np.asarray(anchors.random_anchors(jax.random.key(0), 5, 4, 6, 7))
  assert mask.shape == (5, 4, 6) and mask.dtype == np.float32
  assert set(np.unique(mask)) == {0.0, 1.0}
  np.testing.assert_array_equal(mask.sum((1, 2)), 7)
  assert len({m.tobytes() for m in mask}) == 5
  np.testing.assert_array_equal(anchors.random_anchors(jax.random.key(0), 5, 4, 6, 7), mask)
  np.testing.assert_array_equal(anchors.random_anchors(jax.random.key(1), 2, 2, 2, 4), 1)
  with pytest.raises(ValueError):
    anchors.random_anchors(jax.random.key(0), 1, 2, 2, 5)


# Bins in ab units. Top-10 by logit are bins 0..9 (in logit order 3, 0, 7, ...); bins 10 and 11 are
# the farthest of all but have the lowest logits, so they must never be chosen.
_BINS = np.array([[10, 0], [0, -30], [40, 0], [0, 0], [20, 30], [-10, 5], [5, 5], [0, 40], [30, 0],
                  [-20, 0], [100, 100], [-100, -100]], np.float32)


def test_diverse_labels_hand_computed():
  logits = np.full((1, 1, 2, 12), -5.0, np.float32)
  logits[..., 10] = -4.0
  # Token 0: top-1 is bin 3 at (0, 0). Bins 2 (40, 0) and 7 (0, 40) are both 40 away, the farthest;
  # bin 2 ranks higher, so it wins the tie. d(c, (0, 0)) + d(c, (40, 0)) then peaks at bin 7:
  # 40 + 56.6 = 96.6, ahead of bins 1 (0, -30) and 9 (-20, 0) at 80.
  logits[0, 0, 0, :10] = [9, 3, 8, 10, 2, 1, 0.5, 7, 6, 4]
  # Token 1: bin 7 is ranked above bin 2, so the d=40 tie now goes to bin 7 at (0, 40); then the
  # sum d(c,(0,0)) + d(c,(0,40)) is 30 + 70 = 100 for bin 1 (0, -30), the maximum.
  logits[0, 0, 1, :10] = [9, 3, 7, 10, 2, 1, 0.5, 8, 6, 4]
  got = np.asarray(anchors.diverse_labels(jnp.asarray(logits), jnp.asarray(_BINS)))
  assert got.shape == (3, 1, 1, 2) and got.dtype == np.int32
  np.testing.assert_array_equal(got[:, 0, 0, 0], [3, 2, 7])
  np.testing.assert_array_equal(got[:, 0, 0, 1], [3, 7, 1])
  # With topk=12 the far-away bins enter; both are 141 from (0, 0) and bin 10 ranks higher; then
  # bin 11 is 283 from bin 10.
  np.testing.assert_array_equal(
      anchors.diverse_labels(jnp.asarray(logits), jnp.asarray(_BINS), topk=12)[:, 0, 0, 0], [3, 10, 11])


def test_mode_labels():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 4, 313))
  got = anchors.mode_labels(logits)
  assert got.shape == (2, 3, 4) and got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))


def test_sampled_labels_seeded_tempered_and_distributed():
  # Every token holds the logits 2 log(p) in its own bin order; at T=2 its samples follow p. Each
  # call passes the temperature explicitly so that one compiled program serves all of them.
  p = np.array([0.5, 0.3, 0.2])
  order = np.stack([np.random.default_rng(i).permutation(3) for i in range(8)]).reshape(2, 2, 2, 3)
  logits = jnp.asarray(2 * np.log(p)[order], jnp.float32)  # (2, 2, 2, 3)
  draw = jax.jit(anchors.sampled_labels, static_argnums=2)
  a = np.asarray(draw(jax.random.key(1), logits, 2000, 2.0))
  assert a.shape == (2000, 2, 2, 2) and a.dtype == np.int32
  np.testing.assert_array_equal(draw(jax.random.key(1), logits, 2000, 2.0), a)
  assert (draw(jax.random.key(2), logits, 2000, 2.0) != a).any()
  np.testing.assert_array_equal(draw(jax.random.key(3), logits, 2000, 1e-3),
                                np.broadcast_to(anchors.mode_labels(logits), a.shape))
  drawn = np.take_along_axis(np.broadcast_to(order, a.shape + (3,)), a[..., None], -1)  # index into p
  np.testing.assert_allclose(np.bincount(drawn.ravel(), minlength=3) / drawn.size, p, atol=0.02)
