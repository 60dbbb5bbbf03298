"""Layers with PyTorch's exact semantics where DISCO depends on them.

- `Conv`: 3x3 convolution with padding 1 on every side (also at stride 2, where 'SAME' would pad
  (0, 1) and shift the grid), xavier-uniform kernel and PyTorch's default U(+-1/sqrt(fan_in)) bias.
- `SNConv`: the same convolution under PyTorch's `spectral_norm`: one power iteration per training
  forward, the stored u and v at inference.
- `ConvTranspose`: PyTorch's ConvTranspose2d(k=4, s=2, p=1).
- `BatchNorm`: PyTorch's BatchNorm2d (momentum 0.1, unbiased running variance).
- `max_pool_2x2`: PyTorch's MaxPool2d(2, 2), gradient to the first maximum.
- `relu`, `leaky_relu`: flax's, with the gradient taken from the output to save memory.
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

xavier_uniform = nn.initializers.xavier_uniform()
_DN = ('NHWC', 'HWIO', 'NHWC')


def torch_bias_init(fan_in: int) -> Callable:
  """PyTorch's default bias initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv2d(x, kernel, stride=1):
  """3x3 convolution, padding 1 on every side. x `(B, H, W, Ci)`, kernel `(3, 3, Ci, Co)`.

  `x` may also be a tuple of arrays whose channels add up to Ci: the convolution of their channel
  concatenation, which the backward pass then rebuilds from the parts instead of keeping it (the
  parts are usually kept anyway, as inputs of other convolutions).
  """
  if isinstance(x, tuple):
    return _conv3x3_parts(x, kernel.astype(x[0].dtype), stride)
  return _conv3x3(x, kernel.astype(x.dtype), stride)


def _plain_conv3x3(x, kernel, stride, rows=(1, 1)):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), (rows, (1, 1)),
                                      dimension_numbers=_DN)


# XLA:CPU computes a convolution's kernel gradient at 50-90 GFLOP/s, mostly on one thread, when
# the image is large (256x256, 64 -> 64 channels: ~220 ms at batch 2, against ~56 ms for the
# forward), and 2-3x faster as a sum over bands of about this many output positions per image
# (bench/NOTES.md). Smaller images keep the single convolution, which is as fast there.
_BAND_POSITIONS = 4096


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, kernel, stride):
  return _plain_conv3x3(x, kernel, stride)


def _conv3x3_fwd(x, kernel, stride):
  return _plain_conv3x3(x, kernel, stride), (x, kernel)


def _conv3x3_bwd(stride, residuals, dy):
  """The input gradient as XLA forms it; the kernel gradient summed over bands of output rows.

  The same sums in another order, and shorter ones: closer to the exact value than XLA's single
  reduction (bench/NOTES.md).
  """
  x, kernel = residuals

  def kernel_grad(x, dy, rows):
    return jax.vjp(lambda k: _plain_conv3x3(x, k, stride, rows), kernel)[1](dy)[0]

  dx = jax.vjp(lambda x: _plain_conv3x3(x, kernel, stride), x)[1](dy)[0]
  _, ho, wo, _ = dy.shape
  rows = max(1, _BAND_POSITIONS // wo)
  if ho * wo < 4 * _BAND_POSITIONS or rows >= ho:
    dkernel = kernel_grad(x, dy, (1, 1))
    # The rest of the backward pass waits for the kernel gradient: else XLA's scheduler runs the
    # whole chain of input gradients first and leaves every kernel gradient, with the layer input
    # and output gradient it reads, for the end (70 MB more at the peak of the 256x256 batch-2
    # training step).
    return _waiting_for(dx, dkernel), dkernel
  padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))  # rows only: columns pad in the conv
  # At least float32 for the sum of 16+ bands, bfloat16 kernels too (and float64 stays float64).
  total = jnp.promote_types(kernel.dtype, jnp.float32)
  dkernel = jnp.zeros(kernel.shape, total)
  for r0 in range(0, ho, rows):
    r1 = min(ho, r0 + rows)
    band = padded[:, r0 * stride:(r1 - 1) * stride + 3]  # the input rows output rows r0..r1 see
    dkernel += kernel_grad(band, dy[:, r0:r1], (0, 0)).astype(total)
  return _waiting_for(dx, dkernel), dkernel.astype(kernel.dtype)


def _waiting_for(x, y):
  """`x` + 0 * sum(`y`): the same values, computed only once `y` is (where `y` is not finite, the
  step's gradients are not either way). XLA does not fold 0 * y for floats; the scheduling barrier
  `lax.optimization_barrier` is removed before XLA:CPU schedules."""
  return x + jnp.zeros((), x.dtype) * jnp.sum(y).astype(x.dtype)


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_parts(parts, kernel, stride):
  return _plain_conv3x3(jnp.concatenate(parts, -1), kernel, stride)


def _conv3x3_parts_fwd(parts, kernel, stride):
  return _conv3x3_parts(parts, kernel, stride), (parts, kernel)


def _conv3x3_parts_bwd(stride, residuals, dy):
  parts, kernel = residuals
  # Rebuilt once dy is there: else XLA merges it with the forward pass's concatenation, which then
  # stays alive until here (70 MB at the peak of the 256x256 batch-2 training step).
  x = jnp.concatenate((_waiting_for(parts[0], dy),) + parts[1:], -1)
  dx, dkernel = _conv3x3_bwd(stride, (x, kernel), dy)
  ends = np.cumsum([p.shape[-1] for p in parts])[:-1]
  return tuple(jnp.split(dx, ends, axis=-1)), dkernel


_conv3x3_parts.defvjp(_conv3x3_parts_fwd, _conv3x3_parts_bwd)


class Conv(nn.Module):
  features: int
  stride: int = 1
  use_bias: bool = True
  kernel_init: Callable = xavier_uniform

  @nn.compact
  def __call__(self, x):
    """x `(B, H, W, Ci)`, or a tuple of arrays to concatenate along channels (see `conv2d`)."""
    ci = sum(p.shape[-1] for p in x) if isinstance(x, tuple) else x.shape[-1]
    fan_in = 9 * ci
    kernel = self.param('kernel', self.kernel_init, (3, 3, ci, self.features))
    y = conv2d(x, kernel, self.stride)
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
    return conv2d(x, kernel / sigma, self.stride) + bias.astype(x.dtype)


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


def _windows_2x2(x):
  """`(B, H, W, C)` -> `(B, H // 2, W // 2, 4, C)`: each 2x2 window's values in row-major order.

  An odd last row or column is dropped, as torch's MaxPool2d(2, 2) floors."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, h // 2, w // 2, 4, c)


@jax.custom_vjp
def max_pool_2x2(x):
  """MaxPool2d(2, 2): `(B, H, W, C)` -> `(B, H // 2, W // 2, C)`; the gradient goes to each window's
  first maximum, as torch routes it.

  The same function as `nn.max_pool(x, (2, 2), strides=(2, 2))`, as elementwise fusions: XLA:CPU
  runs that one's gradient as a reduce-window over (value, index) pairs, ~3x slower at 256x256.
  """
  return jnp.max(_windows_2x2(x), axis=3)


def _max_pool_2x2_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_bwd(residuals, dy):
  x, y = residuals
  b, h, w, c = x.shape
  hits = _windows_2x2(x) == y[:, :, :, None]
  taken = jnp.zeros_like(hits[:, :, :, 0])
  routed = []
  for k in range(4):
    first = hits[:, :, :, k] & ~taken
    taken = taken | hits[:, :, :, k]
    routed.append(jnp.where(first, dy, jnp.zeros_like(dy)))
  dx = jnp.stack(routed, 3).reshape(b, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  dx = dx.reshape(b, h // 2 * 2, w // 2 * 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


class BatchNorm(nn.Module):
  """PyTorch BatchNorm2d over NHWC: batch statistics in training, running ones otherwise.

  Under `jax.jit` with the batch sharded over devices, the means below are global, so the
  statistics are synchronised across devices like SyncBatchNorm without any axis name.
  Statistics are computed in float32 whatever the activation dtype.
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
    if train:
      xf = x.astype(jnp.float32)
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
    if x.dtype != jnp.float32:
      # x * mul - mean * mul cancels badly in bf16 when |mean| >> std: normalise in float32.
      return ((x.astype(jnp.float32) - mean) * mul + bias).astype(x.dtype)
    return x * mul + (bias - mean * mul)


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


def relu(x):
  """`nn.relu`, with the same gradient (0 at x = 0) taken from the output: see `leaky_relu`."""
  return _rectify(x, 0.0)


def leaky_relu(x, slope):
  """`nn.leaky_relu(x, slope)`, slope > 0, with the same gradient (1 at x = 0) taken from the output.

  Autodiff of `nn.relu`/`nn.leaky_relu` keeps the input for the backward pass: after a convolution
  that is a second activation-sized array besides the output, which the next convolution keeps
  anyway. Their sign is the same, so the backward pass needs only the output (0.19 GB less at the
  peak of the 256x256 batch-2 training step; bench/NOTES.md).
  """
  if slope <= 0:
    raise ValueError(f'leaky_relu: slope must be positive, got {slope}')
  return _rectify(x, slope)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _rectify(x, slope):
  return nn.leaky_relu(x, slope) if slope else nn.relu(x)


def _rectify_fwd(x, slope):
  y = _rectify(x, slope)
  return y, y


def _rectify_bwd(slope, y, dy):
  if slope:  # y >= 0 exactly where x >= 0 (-0.0 included), NaN in neither
    return (jnp.where(y >= 0, dy, slope * dy),)
  return (jnp.where(y > 0, dy, jnp.zeros_like(dy)),)


_rectify.defvjp(_rectify_fwd, _rectify_bwd)
