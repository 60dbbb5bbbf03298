"""pytorch-fid's InceptionV3 up to pool3 in Flax: the feature network of FID.

Submodule names are torchvision's state-dict paths, so that `weights.inception` converts
pytorch-fid's file by a fixed rule.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

FEATURE_DIM = 2048  # pool3 width
INCEPTION_SIZE = 299  # input side the FID network was trained and is always evaluated at


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) + BatchNorm (eps 1e-3, running stats) + ReLU.

  `padding` is torch's symmetric (pad_h, pad_w). Submodules 'conv' and 'bn' mirror the state dict.
  """
  features: int
  kernel_size: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def avg_pool_3x3_exclude_pad(x):
  """3x3 stride-1 average pool, padding 1, padded zeros not counted (count_include_pad=False).

  pytorch-fid's FIDInceptionA/C/E differ from torchvision here: the TF graph the weights come from
  averages border windows over their real pixels only. (B, H, W, C) -> (B, H, W, C).
  """
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride_2(x):
  # torch MaxPool2d(3, stride=2) floors the output size, as 'VALID' does.
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, 1, name='branch1x1')(x)
    b5 = BasicConv2d(48, 1, name='branch5x5_1')(x)
    b5 = BasicConv2d(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv2d(self.pool_features, 1, name='branch_pool')(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, 3, strides=2, name='branch3x3')(x)
    bd = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv2d(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name='branch1x1')(x)
    b7 = BasicConv2d(c7, 1, name='branch7x7_1')(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv2d(c7, 1, name='branch7x7dbl_1')(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv2d(192, 1, name='branch_pool')(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, 1, name='branch3x3_1')(x)
    b3 = BasicConv2d(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, 1, name='branch7x7x3_1')(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (`max_pool=False`) and Mixed_7c (`max_pool=True`).

  pytorch-fid's FIDInceptionE_2 pools with a 3x3 max pool where torchvision averages: a bug in the
  TF graph the FID weights come from, which FID numbers depend on.
  """
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, 1, name='branch1x1')(x)
    b3 = BasicConv2d(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = BasicConv2d(448, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.max_pool:
      # Padding is -inf for a max pool in both frameworks, so border windows see real pixels only.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = avg_pool_3x3_exclude_pad(x)
    bp = BasicConv2d(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's InceptionV3 up to pool3. (B, 299, 299, 3) in [-1, 1] -> (B, 2048).

  Submodule names are torchvision's state-dict paths, so converting weights is a fixed rule.
  """

  @nn.compact
  def __call__(self, x):
    x = BasicConv2d(32, 3, strides=2, name='Conv2d_1a_3x3')(x)  # (B, 149, 149, 32)
    x = BasicConv2d(32, 3, name='Conv2d_2a_3x3')(x)  # (B, 147, 147, 32)
    x = BasicConv2d(64, 3, padding=1, name='Conv2d_2b_3x3')(x)  # (B, 147, 147, 64)
    x = _max_pool_3x3_stride_2(x)  # (B, 73, 73, 64)
    x = BasicConv2d(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, name='Conv2d_4a_3x3')(x)  # (B, 71, 71, 192)
    x = _max_pool_3x3_stride_2(x)  # (B, 35, 35, 192)
    x = InceptionA(32, name='Mixed_5b')(x)  # (B, 35, 35, 256)
    x = InceptionA(64, name='Mixed_5c')(x)  # (B, 35, 35, 288)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)  # (B, 17, 17, 768)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)  # (B, 8, 8, 1280)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)  # (B, 8, 8, 2048)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))  # (B, 2048): global average pool = pool3


def inception_features(variables, rgb):
  """pool3 features for FID. `rgb` (B, H, W, 3) in [0, 1] -> (B, 2048) float32.

  Images are resized bilinearly to 299x299 without antialiasing: pytorch-fid uses
  F.interpolate(mode='bilinear', align_corners=False), which samples at half-pixel centres (as
  jax.image.resize does) and does not low-pass when shrinking.
  """
  rgb = jnp.asarray(rgb, jnp.float32)
  if rgb.ndim != 4 or rgb.shape[-1] != 3:
    raise ValueError(f'inception_features: expected RGB (B, H, W, 3), got {rgb.shape}')
  x = jax.image.resize(rgb, (rgb.shape[0], INCEPTION_SIZE, INCEPTION_SIZE, 3), 'bilinear',
                       antialias=False)
  return InceptionV3().apply(variables, 2.0 * x - 1.0)
