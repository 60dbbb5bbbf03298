"""Custom VJPs tuned for XLA:CPU: the same functions as the plain ops, with backward passes that
XLA:CPU runs faster or in less memory (bench/NOTES.md has the figures).

- `conv3x3`: 3x3 convolution, padding 1, whose kernel gradient is summed over bands of output rows
  on large images and whose input gradient waits for the kernel gradient (`_waiting_for`).
- `conv3x3_parts`: the same over a channel concatenation that the backward pass rebuilds from its
  parts instead of keeping it.
- `max_pool_2x2`: MaxPool2d(2, 2) as elementwise fusions, the gradient to each window's first maximum.
- `rectify`: ReLU / LeakyReLU with the gradient taken from the output.

`models.layers` picks these or the plain ops, as each module's `cpu_kernels` field says; nothing
else calls them. `wanted` turns the `config.model.cpu_kernels` setting into that field.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
SETTINGS = ('auto', 'on', 'off')  # config.model.cpu_kernels


def wanted(setting: str, devices) -> bool:
  """Whether to use these kernels for a computation compiled for `devices` (a mesh's or a list).

  'auto' is judged from the devices rather than `jax.default_backend()`: a TPU compile on a CPU
  host (bench/aot.py) gets the plain ops. Off CPU these kernels hurt: the input gradients' wait for
  the kernel gradient (`_waiting_for`) also waits for its all-reduce, and banding splits one
  autotuned convolution into many (bench/NOTES.md).
  """
  if setting not in SETTINGS:
    raise ValueError(f'config.model.cpu_kernels={setting!r} must be one of {SETTINGS}')
  if setting != 'auto':
    return setting == 'on'
  return all(d.platform == 'cpu' for d in devices)


def _plain_conv3x3(x, kernel, stride, rows=(1, 1)):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), (rows, (1, 1)),
                                      dimension_numbers=DIMENSION_NUMBERS)


# XLA:CPU computes a large image's convolution kernel gradient slowly and mostly on one thread,
# and faster as a sum over bands of about this many output positions per image (bench/NOTES.md).
# Smaller images keep the single convolution, which is as fast there.
_BAND_POSITIONS = 4096


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x, kernel, stride):
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
    # and output gradient it reads, for the end (a higher peak of memory: bench/NOTES.md).
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


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_parts(parts, kernel, stride):
  return _plain_conv3x3(jnp.concatenate(parts, -1), kernel, stride)


def _conv3x3_parts_fwd(parts, kernel, stride):
  return conv3x3_parts(parts, kernel, stride), (parts, kernel)


def _conv3x3_parts_bwd(stride, residuals, dy):
  parts, kernel = residuals
  # Rebuilt once dy is there: else XLA merges it with the forward pass's concatenation, which then
  # stays alive until here (bench/NOTES.md).
  x = jnp.concatenate((_waiting_for(parts[0], dy),) + parts[1:], -1)
  dx, dkernel = _conv3x3_bwd(stride, (x, kernel), dy)
  ends = np.cumsum([p.shape[-1] for p in parts])[:-1]
  return tuple(jnp.split(dx, ends, axis=-1)), dkernel


conv3x3_parts.defvjp(_conv3x3_parts_fwd, _conv3x3_parts_bwd)


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
  runs that one's gradient as a reduce-window over (value, index) pairs, several times slower.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def rectify(x, slope):
  return nn.leaky_relu(x, slope) if slope else nn.relu(x)


def _rectify_fwd(x, slope):
  y = rectify(x, slope)
  return y, y


def _rectify_bwd(slope, y, dy):
  if slope:  # y >= 0 exactly where x >= 0 (-0.0 included), NaN in neither
    return (jnp.where(y >= 0, dy, slope * dy),)
  return (jnp.where(y > 0, dy, jnp.zeros_like(dy)),)


rectify.defvjp(_rectify_fwd, _rectify_bwd)
