"""Layers with PyTorch's exact semantics where DISCO depends on them.

- `Conv`: 3x3 convolution with padding 1 on every side (also at stride 2, where 'SAME' would pad
  (0, 1) and shift the grid), xavier-uniform kernel and PyTorch's default U(+-1/sqrt(fan_in)) bias.
- `SNConv`: the same convolution under PyTorch's `spectral_norm`: one power iteration per training
  forward, the stored u and v at inference.
- `ConvTranspose`: PyTorch's ConvTranspose2d(k=4, s=2, p=1).
- `BatchNorm`: PyTorch's BatchNorm2d (momentum 0.1, unbiased running variance).
- `max_pool_2x2`: PyTorch's MaxPool2d(2, 2), gradient to the first maximum.
- `relu`, `leaky_relu`: flax's, with the gradient taken from the output to save memory.

With `cpu_kernels`, convolutions, the max pool and the activations run through `kernels.cpu`'s
custom VJPs (faster or smaller backward passes on XLA:CPU); without, through the plain ops
(`lax.conv_general_dilated`, `nn.max_pool`, `nn.relu`), which accelerators schedule and overlap
better. `Conv`, `SNConv` and the networks of `models` have a `cpu_kernels` field, False by
default, that they pass down (`config.model.cpu_kernels`, resolved by `kernels.cpu.wanted`). The
functions take the kernels by default: `tests/test_layers.py` pins their CPU behaviour through
them.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from disco_jax.kernels import cpu

xavier_uniform = nn.initializers.xavier_uniform()
_DN = cpu.DIMENSION_NUMBERS


def at_least_float32(dtype):
  """The dtype of statistics, softmaxes and outputs for compute `dtype`: float32 for float32 and
  bfloat16, float64 for float64 (parity runs under jax_enable_x64 must not drop to float32)."""
  return jnp.promote_types(dtype, jnp.float32)


def torch_bias_init(fan_in: int) -> Callable:
  """PyTorch's default bias initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv2d(x, kernel, stride=1, cpu_kernels=True):
  """3x3 convolution, padding 1 on every side. x `(B, H, W, Ci)`, kernel `(3, 3, Ci, Co)`.

  `x` may also be a tuple of arrays whose channels add up to Ci: the convolution of their channel
  concatenation, which with `cpu_kernels` the backward pass rebuilds from the parts instead of
  keeping it (the parts are usually kept anyway, as inputs of other convolutions).
  """
  if not cpu_kernels:
    x = jnp.concatenate(x, -1) if isinstance(x, tuple) else x
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride),
                                        ((1, 1), (1, 1)), dimension_numbers=_DN)
  if isinstance(x, tuple):
    return cpu.conv3x3_parts(x, kernel.astype(x[0].dtype), stride)
  return cpu.conv3x3(x, kernel.astype(x.dtype), stride)


class Conv(nn.Module):
  features: int
  stride: int = 1
  use_bias: bool = True
  kernel_init: Callable = xavier_uniform
  cpu_kernels: bool = False  # see the module docstring

  @nn.compact
  def __call__(self, x):
    """x `(B, H, W, Ci)`, or a tuple of arrays to concatenate along channels (see `conv2d`)."""
    ci = sum(p.shape[-1] for p in x) if isinstance(x, tuple) else x.shape[-1]
    fan_in = 9 * ci
    kernel = self.param('kernel', self.kernel_init, (3, 3, ci, self.features))
    y = conv2d(x, kernel, self.stride, self.cpu_kernels)
    if self.use_bias:
      y = y + self.param('bias', torch_bias_init(fan_in), (self.features,)).astype(y.dtype)
    return y


def _l2_normalise(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SNConv(nn.Module):
  """3x3 convolution with spectral normalisation, W = kernel / sigma.

  The kernel's matrix view is `(9 * Ci, Co)` (HWI flattened); `u` `(Co,)` and `v` `(9 * Ci,)` live in
  the 'spectral' collection. With `update=True` (training) one power iteration refreshes them,
  v <- normalise(W^T u), u <- normalise(W v), as torch does, and sigma = u^T W v with u and v held
  constant (no gradient through them). With `update=False` the stored vectors are used unchanged.
  """
  features: int
  stride: int = 1
  cpu_kernels: bool = False  # see the module docstring

  @nn.compact
  def __call__(self, x, update: bool = False):
    ci = x.shape[-1]
    kernel = self.param('kernel', xavier_uniform, (3, 3, ci, self.features))
    bias = self.param('bias', torch_bias_init(9 * ci), (self.features,))
    mat = kernel.reshape(-1, self.features).T  # (Co, 9 * Ci), torch's weight_mat layout up to a permutation

    def init_vectors():
      # PyTorch starts from random unit vectors; a few power iterations here make a freshly
      # initialised model usable in eval mode (sigma ~ top singular value, with a positive sign).
      key_u = self.make_rng('params') if self.has_rng('params') else jax.random.key(0)
      u = _l2_normalise(jax.random.normal(key_u, (self.features,)))
      m = jax.lax.stop_gradient(mat)
      u = jax.lax.fori_loop(0, 10, lambda _, u: _l2_normalise(m @ _l2_normalise(m.T @ u)), u)
      return u, _l2_normalise(m.T @ u)

    init = None if self.has_variable('spectral', 'u') else init_vectors()
    u_var = self.variable('spectral', 'u', lambda: init[0])
    v_var = self.variable('spectral', 'v', lambda: init[1])
    u, v = u_var.value, v_var.value
    if update:
      m = jax.lax.stop_gradient(mat)
      v = _l2_normalise(m.T @ u)
      u = _l2_normalise(m @ v)
      if self.is_mutable_collection('spectral') and not self.is_initializing():
        u_var.value, v_var.value = u, v
    sigma = jnp.dot(u, jnp.dot(mat, v, precision=jax.lax.Precision.HIGHEST))
    return conv2d(x, kernel / sigma, self.stride, self.cpu_kernels) + bias.astype(x.dtype)


class ConvTranspose(nn.Module):
  """PyTorch ConvTranspose2d(kernel 4, stride 2, padding 1): `(B, H, W, Ci)` -> `(B, 2H, 2W, Co)`.

  kernel[ky, kx, i, o] = torch_weight[i, o, ky, kx]. out[2 iy - 1 + ky] += in[iy] * W[ky], which is
  a stride-1 convolution of the 2x-dilated input, padded by 2, with the spatially flipped kernel.
  (The sub-pixel form, one 3x3 convolution to 4 Co channels and depth-to-space, computes the same
  and measured slower on XLA:CPU: bench/NOTES.md.)
  """
  features: int

  @nn.compact
  def __call__(self, x):
    ci = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.he_normal(), (4, 4, ci, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    y = jax.lax.conv_general_dilated(
        x, kernel[::-1, ::-1].astype(x.dtype), (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2),
        dimension_numbers=_DN)
    return y + bias.astype(y.dtype)


def max_pool_2x2(x, cpu_kernels=True):
  """MaxPool2d(2, 2): `(B, H, W, C)` -> `(B, H // 2, W // 2, C)`, odd sizes floored; the gradient
  goes to each window's first maximum, as torch routes it."""
  if not cpu_kernels:
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  return cpu.max_pool_2x2(x)


class BatchNorm(nn.Module):
  """PyTorch BatchNorm2d over NHWC: batch statistics in training, running ones otherwise.

  Under `jax.jit` with the batch sharded over devices, the means below are global, so the
  statistics are synchronised across devices like SyncBatchNorm without any axis name.
  Statistics are computed in float32 whatever the activation dtype (float64 for float64).
  """
  momentum: float = 0.1  # PyTorch convention: new = (1 - m) old + m batch
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    stat_dtype = at_least_float32(x.dtype)
    if train:
      xf = x.astype(stat_dtype)
      mean = jnp.mean(xf, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        n = x.size // c
        # PyTorch tracks the unbiased variance but normalises with the biased one.
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * var * n / max(n - 1, 1)
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.eps)
    # Centred before scaling: x * mul - mean * mul cancels when |mean| >> std, in bf16's forward
    # and in float32's gradient (its d/dmul is sum(g x) - mean sum(g)); see bench/NOTES.md.
    return ((x.astype(stat_dtype) - mean) * mul + bias).astype(x.dtype)


# Name of the activations kept when the training step rematerialises (`config.model.remat`).
BLOCK_OUTPUT = 'block_output'
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(BLOCK_OUTPUT)


def block_output(x):
  """Marks `x` as a block boundary: saved for the backward pass when rematerialising."""
  return checkpoint_name(x, BLOCK_OUTPUT)


def rematerialised(module_class, enabled: bool, static_argnums=()):
  """`module_class`, or with `enabled` its version that keeps only block outputs for the backward
  pass and recomputes the rest from them: activation memory falls to about the block outputs, for
  about one more forward pass of compute. The parameter paths stay the same.

  Only for deterministic networks (the CNNs); `static_argnums` (Python values such as `train`)
  count `self` as 0 for a submodule.
  """
  if not enabled:
    return module_class
  return nn.remat(module_class, static_argnums=static_argnums, policy=REMAT_POLICY)


def upsample2x(x):
  """Nearest-neighbour x2 upsampling `(B, H, W, C)` -> `(B, 2H, 2W, C)`."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def relu(x, cpu_kernels=True):
  """`nn.relu`, with `cpu_kernels` the same gradient (0 at x = 0) taken from the output: see
  `leaky_relu`."""
  return cpu.rectify(x, 0.0) if cpu_kernels else nn.relu(x)


def leaky_relu(x, slope, cpu_kernels=True):
  """`nn.leaky_relu(x, slope)`, slope > 0, with the same gradient (1 at x = 0) taken from the output.

  Autodiff of `nn.relu`/`nn.leaky_relu` keeps the input for the backward pass: after a convolution
  that is a second activation-sized array besides the output, which the next convolution keeps
  anyway. Their sign is the same, so the backward pass needs only the output (bench/NOTES.md).
  Without `cpu_kernels`, flax's: XLA on accelerators fuses the activation into its neighbours.
  """
  if slope <= 0:
    raise ValueError(f'leaky_relu: slope must be positive, got {slope}')
  return cpu.rectify(x, slope) if cpu_kernels else nn.leaky_relu(x, slope)
