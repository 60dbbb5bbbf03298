"""SP-pooling and SP-diffusing over the 9-neighbour association map.

Pixel p lies in grid cell c(p) = (y // S, x // S). Channel k of the association map A links p to the
cell c(p) + OFFSETS[k]. Pooling gathers pixel features into superpixel tokens, diffusing scatters
token features back to pixels; both treat cells outside the grid as absent (zero padding), so mass
pointing outside the image is dropped, exactly as the official code does.
"""
import jax.numpy as jnp

STRIDE = 16  # superpixel grid step in pixels
# (dy, dx) of the 9 channels: TL, T, TR, L, C, R, BL, B, BR.
OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
POOL_EPS = 1e-8  # added to the block-averaged denominator, as the official code does


def check_size(height, width, stride=STRIDE):
  if height % stride or width % stride or height <= 0 or width <= 0:
    raise ValueError(
        f'image size {height}x{width} is not a positive multiple of the superpixel stride {stride}: '
        f'resize or pad the image so that both sides are multiples of {stride}')


def _blocks(x, stride):
  """`(B, H, W, C)` -> `(B, h, S, w, S, C)`: each grid cell's pixels on their own axes."""
  b, height, width, c = x.shape
  check_size(height, width, stride)
  return x.reshape(b, height // stride, stride, width // stride, stride, c)


def _gather_neighbours(grid):
  """`(B, h, w, C)` -> `(B, h, w, 9, C)`: entry k of cell c is grid[c + OFFSETS[k]], 0 outside."""
  h, w = grid.shape[1:3]
  padded = jnp.pad(grid, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.stack([padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in OFFSETS], axis=3)


def _scatter_neighbours(per_cell):
  """`(B, h, w, 9, C)` -> `(B, h, w, C)`: cell s sums entry k of cell s - OFFSETS[k] over k.

  The adjoint of `_gather_neighbours`: contributions that would land outside the grid are dropped.
  """
  h, w = per_cell.shape[1:3]
  out = jnp.zeros(per_cell.shape[:3] + per_cell.shape[4:], per_cell.dtype)
  out = jnp.pad(out, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for k, (dy, dx) in enumerate(OFFSETS):
    out = out.at[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w].add(per_cell[:, :, :, k])
  return out[:, 1:-1, 1:-1]


def pool(feat, assoc, stride=STRIDE, precision='highest'):
  """SP-pooling: association-weighted mean of pixel features per superpixel.

  feat `(B, H, W, C)`, assoc `(B, H, W, 9)` -> (tokens `(B, h, w, C)`, conf_sum `(B, h, w)`), where
  conf_sum = sum A / S^2 is the soft size of each superpixel (without eps). precision: the
  einsum's (jax.lax.Precision name; 'highest' is float32 on every backend).
  """
  ones = jnp.ones(feat.shape[:-1] + (1,), feat.dtype)
  fb = _blocks(jnp.concatenate([feat, ones], -1), stride)  # (B, h, S, w, S, C+1)
  ab = _blocks(assoc, stride)  # (B, h, S, w, S, 9)
  # Block means of A_k * f for every channel k: the official avg_pool of f * A_k.
  per_cell = jnp.einsum('bhywxk,bhywxc->bhwkc', ab, fb, precision=precision) / (stride * stride)
  pooled = _scatter_neighbours(per_cell)  # (B, h, w, C+1)
  conf_sum = pooled[..., -1]
  return pooled[..., :-1] / (conf_sum[..., None] + POOL_EPS), conf_sum


def diffuse(tokens, assoc, stride=STRIDE, precision='highest'):
  """SP-diffusing: out(p) = sum_k A_k(p) tokens[c(p) + OFFSETS[k]], tokens zero outside the grid.

  tokens `(B, h, w, C)`, assoc `(B, H, W, 9)` -> `(B, H, W, C)`. No renormalisation: border pixels
  whose mass points outside the grid get attenuated features, as in the official model.
  precision as in `pool`.
  """
  b, height, width, _ = assoc.shape
  neigh = _gather_neighbours(tokens)  # (B, h, w, 9, C)
  out = jnp.einsum('bhywxk,bhwkc->bhywxc', _blocks(assoc, stride), neigh,
                   precision=precision)
  return out.reshape(b, height, width, tokens.shape[-1])


def hard_assoc(assoc):
  """One-hot of argmax_k A `(B, H, W, 9)`; ties set every tied channel, as the official code."""
  return (assoc == jnp.max(assoc, axis=-1, keepdims=True)).astype(assoc.dtype)


def spixel_size(assoc, stride=STRIDE):
  """Hard-assignment size of each superpixel `(B, h, w)`: pixels assigned to it / S^2."""
  hard = _blocks(hard_assoc(assoc), stride)  # (B, h, S, w, S, 9)
  per_cell = jnp.sum(hard, axis=(2, 4))[..., None] / (stride * stride)  # (B, h, w, 9, 1)
  return _scatter_neighbours(per_cell)[..., 0]


def reconstruct(feat, assoc, stride=STRIDE):
  """Pool then diffuse `(B, H, W, C)`: what SPixNet's training loss compares with its input."""
  tokens, _ = pool(feat, assoc, stride)
  return diffuse(tokens, assoc, stride)
