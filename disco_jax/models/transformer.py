"""The post-norm transformer encoder of both colour branches.

Tokens are batch-first `(B, L, d)` in raster order (index = row * w + col). The sine positional
encoding is added to the queries and keys of every layer and never to the values ("dense_pos").
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from disco_jax.models import layers


def sine_position_encoding(h, w, d_model=64, temperature=10000.0):
  """DETR's normalised 2-D sine encoding `(h, w, d_model)`: first half y, second half x.

  Positions run from 1 to n and are scaled to (0, 2 pi], so any grid size spans the same range.
  The arithmetic is float32 step by step, as the official code's (a float32 encoding even in a
  float64 model): positions, frequencies and angles are rounded where torch rounds them, and only
  sin/cos (correctly rounded here) may still differ from torch's by 1 ulp. With synthetic weights
  the training gradient is so ill-conditioned that 1 ulp here moves it by ~1e-7 relative
  (tests/test_train_parity.py).
  """
  half = d_model // 2
  i = np.arange(half)
  exponent = np.float32(2) * (i // 2).astype(np.float32) / np.float32(half)
  # (half,), pairs of equal frequencies: float64 pow rounded to float32 matched the official
  # encoding in more entries than numpy's float32 pow
  dim_t = (np.float64(temperature) ** exponent.astype(np.float64)).astype(np.float32)

  def axis(n):
    e = np.arange(1, n + 1, dtype=np.float32)
    e = e / (e[-1] + np.float32(1e-6)) * np.float32(2 * np.pi)
    ang = (e[:, None] / dim_t).astype(np.float64)  # (n, half), float32 division
    return np.where(i % 2 == 0, np.sin(ang), np.cos(ang)).astype(np.float32)

  y = np.broadcast_to(axis(h)[:, None, :], (h, w, half))
  x = np.broadcast_to(axis(w)[None, :, :], (h, w, half))
  return jnp.asarray(np.concatenate([y, x], axis=-1))


def _linear(features, fan_in, name, dtype, zero_bias=False):
  """torch.nn.Linear: xavier-uniform weight, U(+-1/sqrt(fan_in)) or zero bias."""
  return nn.Dense(features, dtype=dtype, kernel_init=layers.xavier_uniform,
                  bias_init=nn.initializers.zeros if zero_bias else layers.torch_bias_init(fan_in),
                  name=name)


class SelfAttention(nn.Module):
  """torch.nn.MultiheadAttention with q = k = x + pos and v = x, no mask.

  The q, k, v projections are one packed `(d, 3d)` kernel, as torch stores them, so that the
  xavier initialisation sees the packed fan-out like the official model does.
  """
  num_heads: int
  dropout: float
  dtype: Any = jnp.float32  # of the matmuls; the softmax is float32

  @nn.compact
  def __call__(self, x, pos, train: bool):
    b, length, d = x.shape
    head = d // self.num_heads
    kernel = self.param('in_proj_kernel', layers.xavier_uniform, (d, 3 * d)).astype(self.dtype)
    bias = self.param('in_proj_bias', nn.initializers.zeros, (3 * d,)).astype(self.dtype)
    qk = (x + pos) @ kernel[:, :2 * d] + bias[:2 * d]
    v = x @ kernel[:, 2 * d:] + bias[2 * d:]
    split = lambda t: t.reshape(b, length, self.num_heads, head)  # (B, L, heads, head)
    q, k = split(qk[..., :d]), split(qk[..., d:])
    scores = jnp.einsum('bqhc,bkhc->bhqk', q * head ** -0.5, k)
    probs = nn.softmax(scores.astype(layers.at_least_float32(self.dtype)), axis=-1)
    probs = probs.astype(self.dtype)
    probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
    out = jnp.einsum('bhqk,bkhc->bqhc', probs, split(v)).reshape(b, length, d)
    return _linear(d, d, 'out_proj', self.dtype, zero_bias=True)(out)


class EncoderLayer(nn.Module):
  """Post-norm layer: x = LN1(x + MHA(x)); x = LN2(x + FFN(x)), dropout after each sublayer."""
  num_heads: int = 8
  ffn_dim: int = 256
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, train: bool):
    d = x.shape[-1]
    drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=not train)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)
    x = norm('norm1')(x + drop(SelfAttention(self.num_heads, self.dropout, self.dtype,
                                             name='self_attn')(x, pos, train)))
    h = drop(nn.relu(_linear(self.ffn_dim, d, 'linear1', self.dtype)(x)))
    return norm('norm2')(x + drop(_linear(d, self.ffn_dim, 'linear2', self.dtype)(h)))


class Encoder(nn.Module):
  """A stack of `num_layers` encoder layers with no final LayerNorm.

  x `(B, h, w, d)` and pos `(h, w, d)` -> `(B, h, w, d)`.
  """
  num_layers: int = 6
  num_heads: int = 8
  ffn_dim: int = 256
  dropout: float = 0.1
  dtype: Any = jnp.float32  # of the matmuls; the output is float32

  @nn.compact
  def __call__(self, x, pos, train: bool = False):
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d).astype(self.dtype)
    pos = pos.reshape(1, h * w, d).astype(self.dtype)
    for i in range(self.num_layers):
      x = layers.block_output(EncoderLayer(self.num_heads, self.ffn_dim, self.dropout, self.dtype,
                                           name=f'layers_{i}')(x, pos, train))
    return x.reshape(b, h, w, d).astype(layers.at_least_float32(self.dtype))
