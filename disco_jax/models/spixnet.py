"""SPixNet: the superpixel association network, a SpixelFCN-style U-Net on gray only."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.models import layers

NUM_NEIGHBOURS = 9
_SLOPE = 0.1  # LeakyReLU slope of every SPixNet block


class SPixNet(nn.Module):
  """gray `(B, H, W, 1)` -> association map A `(B, H, W, 9)`, a softmax over the 9 neighbours.

  `width` is the first level's channel count (16 in the released model); each level doubles it.
  """
  width: int = 16
  dtype: Any = jnp.float32  # of the convolutions; the softmax is float32
  cpu_kernels: bool = False  # kernels.cpu's custom VJPs (see models.layers)

  def _conv(self, x, features, name, train, stride=1):
    # conv(ci, co, stride): bias-free conv -> BN -> LeakyReLU(0.1); torch indices .0 and .1.
    x = layers.Conv(features, stride, use_bias=False, kernel_init=nn.initializers.he_normal(),
                    cpu_kernels=self.cpu_kernels, name=f'{name}_0')(x)
    x = layers.BatchNorm(name=f'{name}_1')(x, train)
    return layers.block_output(layers.leaky_relu(x, _SLOPE, self.cpu_kernels))

  def _deconv(self, x, features, name):
    return layers.leaky_relu(layers.ConvTranspose(features, name=f'{name}_0')(x), _SLOPE,
                             self.cpu_kernels)

  @nn.compact
  def __call__(self, gray, train: bool = False):
    w = self.width
    skips = []
    x = gray.astype(self.dtype)
    for level in range(5):
      x = self._conv(x, w << level, f'conv{level}a', train, stride=1 if level == 0 else 2)
      x = self._conv(x, w << level, f'conv{level}b', train)
      skips.append(x)
    for level in (3, 2, 1, 0):
      up = self._deconv(x, w << level, f'deconv{level}')
      x = self._conv(jnp.concatenate([skips[level], up], -1), w << level, f'conv{level}_1', train)
    logits = layers.Conv(NUM_NEIGHBOURS, kernel_init=nn.initializers.he_normal(),
                         cpu_kernels=self.cpu_kernels, name='pred_mask0')(x)
    return nn.softmax(logits.astype(layers.at_least_float32(self.dtype)), axis=-1)
