"""RefineNet (`HourGlass2`): a small U-Net from [gray ; diffused features] to ab.

Names follow the official state dict (`up2.conv2.4` -> `up2/conv2_4`). All activations are ReLU and
BatchNorm ends each block. The residual blocks are kept exactly as coded, oddities included.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.models import layers


class _ConvBlock(nn.Module):
  """inConv: Conv -> ReLU -> Conv -> ReLU -> BN (indices inConv.0, conv.0, conv.2). `x` may be a
  tuple of arrays to concatenate along channels (`layers.conv2d`)."""
  features: int

  @nn.compact
  def __call__(self, x, train):
    x = layers.relu(layers.Conv(self.features, name='inConv_0')(x))
    x = layers.relu(layers.Conv(self.features, name='conv_0')(x))
    return layers.block_output(layers.BatchNorm(name='conv_2')(x, train))


class _DownBlock(nn.Module):
  """Conv s2 -> ReLU -> Conv -> ReLU -> BN (indices 0, 2, 4)."""
  features: int

  @nn.compact
  def __call__(self, x, train):
    x = layers.relu(layers.Conv(self.features, 2, name='conv_0')(x))
    x = layers.relu(layers.Conv(self.features, name='conv_2')(x))
    return layers.block_output(layers.BatchNorm(name='conv_4')(x, train))


class _ResidualBlock(nn.Module):
  """ReLU(x + Conv(ReLU(SNConv(Conv(x))))): no norm, no activation between the first two convs."""

  @nn.compact
  def __call__(self, x, train):
    c = x.shape[-1]
    r = layers.Conv(c, name='conv_0')(x)
    r = layers.relu(layers.SNConv(c, name='conv_1')(r, update=train))
    return layers.block_output(layers.relu(x + layers.Conv(c, name='conv_3')(r)))


class _UpBlock(nn.Module):
  """Conv -> nearest x2 -> Conv(cat[x, skip]) -> ReLU -> 2 x [Conv, ReLU] -> BN."""
  features: int

  @nn.compact
  def __call__(self, x, skip, train):
    x = layers.upsample2x(layers.Conv(self.features, name='conv1')(x))
    x = layers.relu(layers.Conv(self.features, name='combine')((x, skip)))
    x = layers.relu(layers.Conv(self.features, name='conv2_0')(x))
    x = layers.relu(layers.Conv(self.features, name='conv2_2')(x))
    return layers.block_output(layers.BatchNorm(name='conv2_4')(x, train))


class RefineNet(nn.Module):
  """gray `(B, H, W, 1)`, diffused `(B, H, W, d)` -> ab_n `(B, H, W, 2)` in (-1, 1) (tanh), float32."""
  width: int = 64
  num_residual: int = 3
  dtype: Any = jnp.float32  # of the convolutions (BatchNorm statistics are float32 regardless)

  @nn.compact
  def __call__(self, gray, diffused, train: bool = False):
    w = self.width
    x0 = _ConvBlock(w, name='inConv')((gray.astype(self.dtype), diffused.astype(self.dtype)), train)
    x1 = _DownBlock(2 * w, name='down1')(x0, train)
    x = _DownBlock(4 * w, name='down2')(x1, train)
    for i in range(self.num_residual):
      x = _ResidualBlock(name=f'residual_{i}')(x, train)
    x = _UpBlock(2 * w, name='up2')(x, x1, train)
    x = _UpBlock(w, name='up1')(x, x0, train)
    return jnp.tanh(layers.Conv(2, name='outConv')(x).astype(layers.at_least_float32(self.dtype)))
