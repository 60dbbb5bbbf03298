"""Colour anchors: where they sit on the token grid and which ab bin each one gets.

Locations follow the official `models/anchor_gen.py` + `models/clusterkit.py`:
k-means per image on the h*w token features (random init, at most 20 iterations), then the largest
superpixel of each cluster; or, for DISCO-rand, k token positions drawn at random. Colours are the
arg-max bin, the deterministic "diverse" top-10 rule, or (an extension) seeded samples.

Everything is a pure function that traces under `jax.jit` with the anchor count `k` static. Tokens
are flattened in raster order, index = row * w + col, so "first token" means first in raster order.
"""
import functools

import jax
import jax.numpy as jnp


def _check_k(k, num_tokens):
  if not 1 <= k <= num_tokens:
    raise ValueError(f'the anchor count k={k} must be between 1 and the token count {num_tokens}')


def kmeans_init(key, num_tokens, k):
  """k distinct token indices `(k,)` int32, uniformly at random: the official init (not k-means++)
  and the DISCO-rand anchor draw."""
  _check_k(k, num_tokens)
  return jax.random.choice(key, num_tokens, (k,), replace=False).astype(jnp.int32)


def kmeans(key, x, k, max_iters=20, tol=1e-4):
  """Lloyd's k-means on one image's tokens, step for step as the official kmeans_pytorch fork.

  Args:
    key: PRNG key. `jax.random.split(key)[0]` draws the initial centres through `kmeans_init`, the
      other half re-seeds clusters that go empty (one fresh key per iteration).
    x: `(L, D)` token features.
    k: number of clusters (static), 1 <= k <= L.
    max_iters: iteration cap (static), >= 1; the official code uses 20.
    tol: stop once (sum_j ||c_j - c_j_prev||)^2 < tol.

  Returns:
    labels `(L,)` int32: the assignments made at the start of the last iteration, i.e. the ones the
      returned centres are the means of (the official loop breaks before re-assigning);
    centres `(k, D)` float32, with no gradient to x.
  """
  num_tokens = x.shape[0]
  _check_k(k, num_tokens)
  if max_iters < 1:
    raise ValueError(f'max_iters={max_iters} must be at least 1')
  # The mask built from the labels is piecewise constant in x, so no useful gradient flows through
  # the clustering; stopping it here also keeps jax.grad of a caller away from the while_loop,
  # which reverse mode cannot differentiate. float32 because the official code calls X.float().
  x = jax.lax.stop_gradient(x).astype(jnp.float32)  # (L, D)
  init_key, reseed_key = jax.random.split(key)
  centres = x[kmeans_init(init_key, num_tokens, k)]  # (k, D)

  def body(carry):
    it, centres, _, _ = carry
    # Squared distances from explicit differences rather than |a|^2 - 2ab + |b|^2: no cancellation,
    # and no reduced-precision matmul on accelerators. argmin takes the lowest index on ties.
    dist = jnp.sum((x[:, None, :] - centres[None, :, :]) ** 2, axis=-1)  # (L, k)
    labels = jnp.argmin(dist, axis=-1).astype(jnp.int32)  # (L,)
    # Cluster sums as a one-hot matmul, not segment_sum: on TPU a scatter-add inside the loop
    # serialises, a (k, L) x (L, D) dot is one MXU op (bench/NOTES.md). HIGHEST: float32 sums.
    member = (labels[None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]).astype(jnp.float32)
    sums = jnp.dot(member, x, precision=jax.lax.Precision.HIGHEST)  # (k, D)
    counts = jnp.sum(member, axis=-1)  # (k,)
    # An empty cluster takes one token drawn uniformly from all L (the authors' fix for
    # kmeans_pytorch issue 16); the other draws are simply unused.
    draw = jax.random.randint(jax.random.fold_in(reseed_key, it), (k,), 0, num_tokens)  # (k,)
    reseed = x[draw]  # (k, D)
    new_centres = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], reseed)
    shift = jnp.sum(jnp.sqrt(jnp.sum((new_centres - centres) ** 2, axis=-1)))
    it = it + 1
    done = (shift ** 2 < tol) | (it >= max_iters)
    return it, new_centres, labels, done

  # Under vmap the loop runs until every image is done, and JAX selects the old carry for images
  # whose predicate is already false, so a finished image keeps its result.
  init = (jnp.int32(0), centres, jnp.zeros((num_tokens,), jnp.int32), jnp.bool_(False))
  _, centres, labels, _ = jax.lax.while_loop(lambda c: ~c[3], body, init)
  return labels, centres


def select_anchors(labels, sizes, k):
  """One anchor per cluster: its largest superpixel. Returns the mask `(L,)` float32.

  `labels` `(L,)` cluster ids, `sizes` `(L,)` hard-assignment superpixel sizes (about 1 for a normal
  superpixel). The official score 1[label == j] + 0.01 * size keeps membership dominant only because
  0.01 * size < 1, i.e. size < 100, which always holds: a superpixel can only gather the 48x48
  pixels of the 3x3 cells around it, so size <= 2304 / 256 = 9. Hence argmax picks the largest
  member, the first in raster order on ties. An empty cluster falls back to the globally largest
  superpixel, which may already be an anchor: the one-hots are summed as in the official code, so
  the mask can then hold a 2.
  """
  member = labels[None, :] == jnp.arange(k, dtype=labels.dtype)[:, None]  # (k, L)
  score = member.astype(jnp.float32) + 0.01 * sizes.astype(jnp.float32)[None, :]  # (k, L)
  winners = jnp.argmax(score, axis=-1)  # (k,)
  return jnp.sum(jax.nn.one_hot(winners, labels.shape[0], dtype=jnp.float32), axis=0)


def _batched_kmeans(key, feats, k, max_iters, tol):
  batch, h, w, dim = feats.shape
  keys = jax.random.split(key, batch)
  run = functools.partial(kmeans, k=k, max_iters=max_iters, tol=tol)
  labels, _ = jax.vmap(run)(keys, feats.reshape(batch, h * w, dim))
  return labels  # (B, h*w)


def kmeans_labels(key, feats, k, max_iters=20, tol=1e-4):
  """Cluster ids `(B, h, w)` int32 of `feats` `(B, h, w, D)`, for visualisation.

  With the same arguments these are exactly the clusters behind `kmeans_anchors`.
  """
  batch, h, w, _ = feats.shape
  return _batched_kmeans(key, feats, k, max_iters, tol).reshape(batch, h, w)


def kmeans_anchors(key, feats, sizes, k, max_iters=20, tol=1e-4):
  """The default anchor mask `(B, h, w)` float32: k-means on `feats` `(B, h, w, D)`, one anchor per
  cluster chosen by `sizes` `(B, h, w)` (see `select_anchors`). One key per image via split(key, B).
  """
  batch, h, w, _ = feats.shape
  labels = _batched_kmeans(key, feats, k, max_iters, tol)  # (B, h*w)
  select = functools.partial(select_anchors, k=k)
  return jax.vmap(select)(labels, sizes.reshape(batch, h * w)).reshape(batch, h, w)


def random_anchors(key, batch, h, w, k):
  """DISCO-rand anchors: exactly k distinct token positions per image, uniformly at random.

  Returns the mask `(B, h, w)` float32 with values in {0, 1}. One key per image via split(key, B).
  """
  keys = jax.random.split(key, batch)
  idx = jax.vmap(lambda kk: kmeans_init(kk, h * w, k))(keys)  # (B, k)
  mask = jnp.sum(jax.nn.one_hot(idx, h * w, dtype=jnp.float32), axis=1)  # (B, h*w)
  return mask.reshape(batch, h, w)


def mode_labels(logits):
  """Arg-max bin `(B, h, w)` int32 of `logits` `(B, h, w, Q)`: the official automatic colour."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def diverse_labels(logits, bins, topk=10):
  """The official `--diverse` rule: three deterministic alternative bins per token.

  Args:
    logits: `(B, h, w, Q)`.
    bins: `(Q, 2)` ab bin centres (any common scale: only distance ratios matter).
    topk: candidate count; the official code uses 10.

  Returns:
    `(3, B, h, w)` int32. Among each token's top-k bins by logit: [0] the top-1; [1] the candidate
    farthest in ab from the top-1; [2] the candidate maximising d(c, top1) + d(c, [1]). Ties go to
    the earlier candidate in top-k order (the official code uses an unstable torch.sort there).
  """
  if not 1 <= topk <= logits.shape[-1]:
    raise ValueError(f'topk={topk} must be between 1 and the bin count {logits.shape[-1]}')
  _, cand = jax.lax.top_k(logits, topk)  # (B, h, w, topk)
  cand_ab = jnp.asarray(bins, jnp.float32)[cand]  # (B, h, w, topk, 2)
  d_top1 = jnp.linalg.norm(cand_ab - cand_ab[..., :1, :], axis=-1)  # (B, h, w, topk)
  far = jnp.argmax(d_top1, axis=-1)  # (B, h, w)
  far_ab = jnp.take_along_axis(cand_ab, far[..., None, None], axis=-2)  # (B, h, w, 1, 2)
  d_far = jnp.linalg.norm(cand_ab - far_ab, axis=-1)  # (B, h, w, topk)
  third = jnp.argmax(d_top1 + d_far, axis=-1)  # (B, h, w)
  pick = lambda i: jnp.take_along_axis(cand, i[..., None], axis=-1)[..., 0]
  return jnp.stack([cand[..., 0], pick(far), pick(third)]).astype(jnp.int32)


def sampled_labels(key, logits, n, temperature=1.0):
  """n seeded samples `(n, B, h, w)` int32 from softmax(logits / temperature), temperature > 0.

  An extension for asking any number of alternatives: the official code never samples (automatic
  mode takes the arg-max, diverse mode the fixed top-10 rule). As temperature -> 0 every sample
  becomes the mode.
  """
  shape = (n,) + logits.shape[:-1]
  return jax.random.categorical(key, logits / temperature, axis=-1, shape=shape).astype(jnp.int32)
