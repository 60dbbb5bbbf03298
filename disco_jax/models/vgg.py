"""Frozen ImageNet VGG19 for DISCO's perceptual loss, and the loss itself.

DISCO trains the RefineNet with
    L_vgg = sum_l c_l * mean|phi_l(pred) - stop_gradient(phi_l(gt))|,
phi_l = relu1_1, relu2_1, relu3_1, relu4_1, relu5_1, c = (1/32, 1/16, 1/8, 1/4, 1).

The weights come from torchvision or from Keras (ported from Caffe), which expect different input
normalisations (`MODES`); `weights.vgg19` converts them and records which one its weights need:
`params, mode = load_vgg19('vgg19.msgpack')`, then `perceptual_loss(params, mode, pred, gt)`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from disco_jax.models import layers

LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # c_l for relu1_1 ... relu5_1

# (output channels, number of 3x3 convs) per block. Only conv5_1 of block 5 is needed: relu5_1 is
# the deepest feature the loss uses.
_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 1))
# (block, index in block) of each conv, in order: conv1_1, conv1_2, conv2_1, ...
BLOCK_CONVS = tuple((b, i) for b, (_, n) in enumerate(_BLOCKS, 1) for i in range(1, n + 1))

_TORCH_MEAN = (0.485, 0.456, 0.406)  # RGB, for inputs in [0, 1]
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # for BGR inputs in [0, 255]
MODES = ('torch', 'caffe')


class VGG19Features(nn.Module):
  """VGG19 (no BN) up to relu5_1. Input `(B, H, W, 3)` already `preprocess`ed.

  Returns (relu1_1, relu2_1, relu3_1, relu4_1, relu5_1), shapes `(B, H / 2**k, W / 2**k, C_k)` with
  C = 64, 128, 256, 512, 512 (pools floor odd sizes, as torch's MaxPool2d(2, 2) does).
  """
  dtype: Any = jnp.float32  # of the convolutions
  cpu_kernels: bool = False  # kernels.cpu's max pool and ReLU (see models.layers)

  @nn.compact
  def __call__(self, x):
    features = []
    for b, (channels, n) in enumerate(_BLOCKS, 1):
      if b > 1:
        x = layers.max_pool_2x2(x, self.cpu_kernels)
      for i in range(1, n + 1):
        x = layers.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                name=f'conv{b}_{i}')(x), self.cpu_kernels)
        if i == 1:
          features.append(x)
      x = layers.block_output(x)
    return tuple(features)


def preprocess(rgb, mode):
  """RGB `(..., 3)` nominally in [0, 1] -> the float32 input that `mode`'s weights were trained on.

  'torch': ImageNet mean/std on RGB in [0, 1]. 'caffe' (Keras' weights): BGR in [0, 255] minus the
  BGR pixel mean, no scaling.
  """
  check_mode(mode, 'preprocess')
  rgb = jnp.asarray(rgb)
  rgb = rgb.astype(layers.at_least_float32(rgb.dtype))  # float64 stays float64 (parity checks)
  if mode == 'torch':
    return (rgb - jnp.array(_TORCH_MEAN)) / jnp.array(_TORCH_STD)
  return rgb[..., ::-1] * 255.0 - jnp.array(_CAFFE_MEAN_BGR)


def check_mode(mode, where):
  if mode not in MODES:
    raise ValueError(f'{where}: unknown VGG19 preprocessing mode {mode!r}; expected one of {MODES}')


def perceptual_loss(params, mode, rgb_pred, rgb_gt, dtype=jnp.float32, remat=False,
                    cpu_kernels=False):
  """L_vgg between RGB batches `(B, H, W, 3)`; a float32 scalar. `mode` is static under jit.

  The convolutions run in `dtype` (bfloat16 for mixed precision), the distances in float32;
  `remat` keeps only block outputs of the prediction's forward for the backward pass;
  `cpu_kernels` as `VGG19Features`'.

  Only the prediction gets a gradient: the ground-truth features are detached. This is DISCO's
  behaviour before 2024; the official repository at HEAD detaches the prediction's features instead
  (commit 3c48626), which leaves the RefineNet with no gradient at all, so we do not follow it.
  """
  # The VGG is frozen: no gradient reaches its weights even if a caller differentiates them.
  vgg19 = layers.rematerialised(VGG19Features, remat)(dtype, cpu_kernels)
  net = lambda x: vgg19.apply({'params': jax.lax.stop_gradient(params)}, x)
  # Two forwards, not one over the concatenated batch: through a concatenation the backward pass
  # would run the whole VGG over the ground-truth half too, only to produce zeros.
  pred = net(preprocess(rgb_pred, mode))
  truth = net(jax.lax.stop_gradient(preprocess(rgb_gt, mode)))
  total = layers.at_least_float32(dtype)  # float32 distances for bfloat16, float64 for float64
  loss = jnp.zeros((), total)
  for weight, fp, ft in zip(LAYER_WEIGHTS, pred, truth):
    loss += weight * jnp.mean(jnp.abs(fp.astype(total) - jax.lax.stop_gradient(ft).astype(total)))
  return loss
