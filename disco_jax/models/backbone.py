"""The backbone (`ColorProbNet`): a VGG-like encoder with spectral norm and a small decoder.

Submodule names follow the official state dict (`conv2_3.4` -> `conv2_3_4`), so that checkpoints
convert by a fixed rule. BatchNorm ends each block, after the activation, as in the official code.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.models import layers

_SLOPE = 0.2


class Backbone(nn.Module):
  """gray `(B, H, W, 1)` -> features `(B, H, W, out_features)`, non-negative (final ReLU).

  `width` is the first block's channels (64 in the released model); the encoder uses 1, 2, 4 and 8
  times it, the decoder 4, 2 and 1 times.
  """
  width: int = 64
  out_features: int = 64
  dtype: Any = jnp.float32  # of the convolutions (BatchNorm statistics are float32 regardless)
  cpu_kernels: bool = False  # kernels.cpu's custom VJPs (see models.layers)

  @nn.compact
  def __call__(self, gray, train: bool = False):
    w = self.width
    k = self.cpu_kernels
    bn = lambda x, name: layers.BatchNorm(name=name)(x, train)
    lrelu = lambda x: layers.leaky_relu(x, _SLOPE, k)
    relu = lambda x: layers.relu(x, k)
    conv = lambda features, name: layers.Conv(features, cpu_kernels=k, name=name)

    def sn_block(x, name, features, num_convs, first_stride):
      # SN convs at sequential indices 0, 2, 4 (LeakyReLU between), BatchNorm last.
      for i in range(num_convs):
        x = layers.SNConv(features, first_stride if i == 0 else 1, k, name=f'{name}_{2 * i}')(
            x, update=train)
        x = lrelu(x)
      return layers.block_output(bn(x, f'{name}_{2 * num_convs}'))

    x = sn_block(gray.astype(self.dtype), 'conv1_2', w, 2, 1)
    x = sn_block(x, 'conv2_3', 2 * w, 3, 2)
    c3 = sn_block(x, 'conv3_3', 4 * w, 3, 2)
    x = sn_block(c3, 'conv4_3', 8 * w, 3, 2)
    for name in ('conv5_3', 'conv6_3', 'conv7_3'):
      x = sn_block(x, name, 8 * w, 3, 1)

    x = conv(4 * w, 'conv8up_1')(layers.upsample2x(x))
    x = x + conv(4 * w, 'conv3short8_0')(c3)
    x = conv(4 * w, 'conv8_3_1')(relu(x))
    x = conv(4 * w, 'conv8_3_3')(relu(x))
    x = layers.block_output(bn(relu(x), 'conv8_3_5'))

    x = conv(2 * w, 'conv9up_1')(layers.upsample2x(x))
    # No activation between conv9up's conv and conv9_2's: as in the official code.
    x = layers.block_output(bn(relu(conv(2 * w, 'conv9_2_0')(x)), 'conv9_2_2'))

    x = conv(w, 'conv10up_1')(layers.upsample2x(x))
    x = conv(self.out_features, 'conv10_2_1')(relu(x))
    return relu(x)
