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
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x, train):
    conv = lambda name: layers.Conv(self.features, cpu_kernels=self.cpu_kernels, name=name)
    x = layers.relu(conv('inConv_0')(x), self.cpu_kernels)
    x = layers.relu(conv('conv_0')(x), self.cpu_kernels)
    return layers.block_output(layers.BatchNorm(name='conv_2')(x, train))


class _DownBlock(nn.Module):
  """Conv s2 -> ReLU -> Conv -> ReLU -> BN (indices 0, 2, 4)."""
  features: int
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x, train):
    conv = lambda stride, name: layers.Conv(self.features, stride, cpu_kernels=self.cpu_kernels,
                                            name=name)
    x = layers.relu(conv(2, 'conv_0')(x), self.cpu_kernels)
    x = layers.relu(conv(1, 'conv_2')(x), self.cpu_kernels)
    return layers.block_output(layers.BatchNorm(name='conv_4')(x, train))


class _ResidualBlock(nn.Module):
  """ReLU(x + Conv(ReLU(SNConv(Conv(x))))): no norm, no activation between the first two convs."""
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x, train):
    c, k = x.shape[-1], self.cpu_kernels
    r = layers.Conv(c, cpu_kernels=k, name='conv_0')(x)
    r = layers.relu(layers.SNConv(c, cpu_kernels=k, name='conv_1')(r, update=train), k)
    return layers.block_output(layers.relu(x + layers.Conv(c, cpu_kernels=k, name='conv_3')(r), k))


class _UpBlock(nn.Module):
  """Conv -> nearest x2 -> Conv(cat[x, skip]) -> ReLU -> 2 x [Conv, ReLU] -> BN."""
  features: int
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x, skip, train):
    conv = lambda name: layers.Conv(self.features, cpu_kernels=self.cpu_kernels, name=name)
    x = layers.upsample2x(conv('conv1')(x))
    x = layers.relu(conv('combine')((x, skip)), self.cpu_kernels)
    x = layers.relu(conv('conv2_0')(x), self.cpu_kernels)
    x = layers.relu(conv('conv2_2')(x), self.cpu_kernels)
    return layers.block_output(layers.BatchNorm(name='conv2_4')(x, train))


class RefineNet(nn.Module):
  """gray `(B, H, W, 1)`, diffused `(B, H, W, d)` -> ab_n `(B, H, W, 2)` in (-1, 1) (tanh), float32."""
  width: int = 64
  num_residual: int = 3
  dtype: Any = jnp.float32  # of the convolutions (BatchNorm statistics are float32 regardless)
  cpu_kernels: bool = False  # kernels.cpu's custom VJPs (see models.layers)

  @nn.compact
  def __call__(self, gray, diffused, train: bool = False):
    w, k = self.width, self.cpu_kernels
    x0 = _ConvBlock(w, k, name='inConv')((gray.astype(self.dtype), diffused.astype(self.dtype)),
                                         train)
    x1 = _DownBlock(2 * w, k, name='down1')(x0, train)
    x = _DownBlock(4 * w, k, name='down2')(x1, train)
    for i in range(self.num_residual):
      x = _ResidualBlock(k, name=f'residual_{i}')(x, train)
    x = _UpBlock(2 * w, k, name='up2')(x, x1, train)
    x = _UpBlock(w, k, name='up1')(x, x0, train)
    return jnp.tanh(layers.Conv(2, cpu_kernels=k, name='outConv')(x).astype(
        layers.at_least_float32(self.dtype)))
