"""LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018), the perceptual distance colorization
papers report beside PSNR and SSIM, as the `lpips` package computes it (`lpips.LPIPS(net='alex')`).

    d(x0, x1) = sum_l mean_hw sum_c w_lc (n(f_l(s(x0))) - n(f_l(s(x1))))**2

s: lpips' ScalingLayer on inputs in [-1, 1]; f_l: torchvision AlexNet's relu1 ... relu5; n: unit
length along channels (lpips' `normalize_tensor`, eps 1e-10 on the norm); w_l: the non-negative
1x1 linear heads lin0 ... lin4. `weights.lpips` converts torchvision's and lpips' files.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

# lpips.ScalingLayer: inputs in [-1, 1] -> the range torchvision's ImageNet normalisation gives.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# (output channels, kernel, stride, padding) of torchvision alexnet's conv1 ... conv5.
CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
# Smallest input side: conv1 (k 11, s 4, p 2) and two 3x3/2 max pools must leave at least 1 pixel.
MIN_SIZE = 31
_EPS = 1e-10  # lpips.normalize_tensor's, added to the norm


def _max_pool_3x3_s2(x):
  """torch's MaxPool2d(3, 2): no padding, odd remainders floored."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'VALID')


class AlexNetFeatures(nn.Module):
  """torchvision `alexnet().features` up to relu5. Input `(B, H, W, 3)` after the scaling layer;
  returns (relu1, ..., relu5) `(B, H_l, W_l, C_l)`, C = 64, 192, 384, 256, 256."""

  @nn.compact
  def __call__(self, x):
    features = []
    for i, (channels, k, stride, pad) in enumerate(CONVS, 1):
      if i in (2, 3):  # the pools before conv2 and conv3 (the one after conv5 is not used)
        x = _max_pool_3x3_s2(x)
      x = nn.relu(nn.Conv(channels, (k, k), strides=(stride, stride),
                          padding=((pad, pad), (pad, pad)), name=f'conv{i}')(x))
      features.append(x)
    return tuple(features)


def _unit(f):
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _EPS)


class LPIPS(nn.Module):
  """LPIPS distance between two RGB batches `(B, H, W, 3)` in [0, 1] -> `(B,)`.

  Variables {'params': {'alexnet': {conv1..conv5: {kernel, bias}}, 'lin0'..'lin4': (C_l,)}}.
  """

  @nn.compact
  def __call__(self, rgb0, rgb1):
    if rgb0.shape != rgb1.shape or rgb0.ndim != 4 or rgb0.shape[-1] != 3:
      raise ValueError(f'LPIPS compares two RGB batches of one shape (B, H, W, 3), got '
                       f'{rgb0.shape} and {rgb1.shape}')
    if min(rgb0.shape[1:3]) < MIN_SIZE:
      raise ValueError(f'LPIPS (AlexNet) needs images of at least {MIN_SIZE} px a side, got '
                       f'{rgb0.shape[1]}x{rgb0.shape[2]}')
    batch = rgb0.shape[0]
    x = jnp.concatenate([rgb0, rgb1]).astype(jnp.float32) * 2 - 1  # lpips' normalize=True
    x = (x - jnp.array(_SHIFT)) / jnp.array(_SCALE)
    total = jnp.zeros((batch,), jnp.float32)
    for l, f in enumerate(AlexNetFeatures(name='alexnet')(x)):
      w = self.param(f'lin{l}', nn.initializers.ones, (f.shape[-1],))  # (C_l,)
      diff = (_unit(f[:batch]) - _unit(f[batch:])) ** 2  # (B, H_l, W_l, C_l)
      total = total + jnp.mean(diff @ w, axis=(1, 2))
    return total
