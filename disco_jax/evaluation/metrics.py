"""Evaluation metrics of the colorization papers: PSNR, SSIM, colorfulness and FID.

Image metrics are pure jax.numpy functions, jit-compatible, on RGB float images in [0, 1],
batch-first NHWC, one value per image. FID compares pool3 features of pytorch-fid's InceptionV3
(`models.inception.inception_features`, weights from `weights.inception`): feed batches of features
to a `FeatureStats` per image set, then
`frechet_distance(stats_a.mean(), stats_a.cov(), stats_b.mean(), stats_b.cov())`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from disco_jax.models.inception import FEATURE_DIM

# SSIM constants of Wang et al. (2004), as skimage uses them with gaussian_weights=True.
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


# ------------------------------------------------------------------------------------------------
# Image metrics
# ------------------------------------------------------------------------------------------------

def psnr(pred, gt):
  """Peak signal-to-noise ratio in dB, data range 1. `pred`, `gt` (B, H, W, C) -> (B,).

  Identical images give +inf, as 10 log10(1 / 0) should.
  """
  pred, gt = _as_images(pred, gt, 'psnr')
  mse = jnp.mean(jnp.square(pred - gt), axis=(1, 2, 3))  # (B,)
  return 10.0 * jnp.log10(1.0 / mse)


def _gaussian_1d(size, sigma):
  """Normalised sampled Gaussian (size,), the same taps as scipy.ndimage's truncated kernel."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def _filter_valid(x, taps):
  """Separable Gaussian over H and W of each channel, 'VALID'. (N, H, W, C) -> (N, H-k+1, W-k+1, C).

  The VALID positions are exactly the ones skimage keeps after cropping its reflect-padded filter
  output, so padding never enters the mean.
  """
  c = x.shape[-1]
  k = taps.shape[0]
  conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=(1, 1), padding='VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
      # Full float32: TF32/bf16 passes on accelerators would cost the 1e-4 agreement with skimage.
      precision=jax.lax.Precision.HIGHEST)
  x = conv(x, jnp.broadcast_to(jnp.asarray(taps).reshape(k, 1, 1, 1), (k, 1, 1, c)))
  return conv(x, jnp.broadcast_to(jnp.asarray(taps).reshape(1, k, 1, 1), (1, k, 1, c)))


def ssim(pred, gt):
  """Mean SSIM (Wang et al. 2004) per image. `pred`, `gt` (B, H, W, C) in [0, 1] -> (B,).

  11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1, population (co)variances;
  SSIM per channel, averaged over channels and the unpadded window positions. Agrees with
  skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False).
  """
  pred, gt = _as_images(pred, gt, 'ssim')
  if min(pred.shape[1:3]) < _SSIM_WINDOW:
    raise ValueError(f'metrics.ssim: images {pred.shape[1:3]} are smaller than the '
                     f'{_SSIM_WINDOW}x{_SSIM_WINDOW} window; pass images at least that large')
  taps = _gaussian_1d(_SSIM_WINDOW, _SSIM_SIGMA)
  b = pred.shape[0]
  # All five local moments in one filter call: (5B, H, W, C).
  stacked = jnp.concatenate([pred, gt, pred * pred, gt * gt, pred * gt])
  mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(_filter_valid(stacked, taps), 5)  # (B, h, w, C) each
  var_x = e_xx - mu_x * mu_x
  var_y = e_yy - mu_y * mu_y
  cov_xy = e_xy - mu_x * mu_y
  c1 = _SSIM_K1 ** 2  # (K1 * data_range)^2 with data_range 1
  c2 = _SSIM_K2 ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
       / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))  # (B, h, w, C)
  # Every channel has the same number of positions, so the mean of channel means is this mean.
  return jnp.mean(s.reshape(b, -1), axis=1)


def colorfulness(rgb):
  """Hasler and Suesstrunk (2003) colorfulness M per image. `rgb` (B, H, W, 3) in [0, 1] -> (B,).

  As the colorization evaluation code computes it: on [0, 255] values, rg = |R - G|,
  yb = |(R + G) / 2 - B|, M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2),
  population standard deviations over all pixels.
  """
  rgb = jnp.asarray(rgb, jnp.float32)
  if rgb.ndim != 4 or rgb.shape[-1] != 3:
    raise ValueError(f'metrics.colorfulness: expected RGB images (B, H, W, 3), got {rgb.shape}')
  r, g, b = jnp.moveaxis(rgb * 255.0, -1, 0)  # (B, H, W) each
  rg = jnp.abs(r - g).reshape(rgb.shape[0], -1)  # (B, H*W)
  yb = jnp.abs(0.5 * (r + g) - b).reshape(rgb.shape[0], -1)
  sigma = jnp.sqrt(jnp.var(rg, axis=1) + jnp.var(yb, axis=1))
  mu = jnp.sqrt(jnp.mean(rg, axis=1) ** 2 + jnp.mean(yb, axis=1) ** 2)
  return sigma + 0.3 * mu


def _as_images(pred, gt, where):
  pred = jnp.asarray(pred, jnp.float32)
  gt = jnp.asarray(gt, jnp.float32)
  if pred.shape != gt.shape or pred.ndim != 4:
    raise ValueError(f'metrics.{where}: expected two image batches (B, H, W, C) of one shape, '
                     f'got {pred.shape} and {gt.shape}')
  return pred, gt


# ------------------------------------------------------------------------------------------------
# Frechet distance and feature statistics
# ------------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 -> Python float.

  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)). The product of two covariances estimated from few
  samples can be singular, and sqrtm then returns non-finite values; like the common FID tool we
  retry with eps * I added to both. A tiny imaginary part from rounding is dropped; a large one
  means the inputs are not covariances, and raises.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'metrics.frechet_distance: expected means (d,) and covariances (d, d), '
                     f'got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}')
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = eps * np.eye(d)
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError('metrics.frechet_distance: sqrtm(sigma1 sigma2) has a large imaginary '
                       f'part ({np.max(np.abs(covmean.imag)):.3g}); are both inputs symmetric '
                       'positive semi-definite covariances?')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
  """Running float64 sums of feature vectors, for the mean and covariance FID needs.

  Host-side (numpy): features arrive batch by batch from the device, and float64 sums keep the
  covariance of tens of thousands of 2048-d vectors accurate, which float32 on device would not.
  """

  def __init__(self, dim=FEATURE_DIM):
    self.dim = dim
    self.count = 0
    self._sum = np.zeros((dim,), np.float64)
    self._outer = np.zeros((dim, dim), np.float64)  # sum of x x^T

  def update(self, features, mask=None):
    """Adds `features` (n, dim); rows where the boolean `mask` (n,) is False (padding) are skipped."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(f'FeatureStats.update: expected features (n, {self.dim}), '
                       f'got {features.shape}')
    if mask is not None:
      mask = np.asarray(mask)
      if mask.shape != features.shape[:1] or mask.dtype != np.bool_:
        raise ValueError(f'FeatureStats.update: mask must be boolean ({features.shape[0]},), got '
                         f'{mask.dtype} {mask.shape}')
      features = features[mask]
    self.count += features.shape[0]
    self._sum += features.sum(axis=0)
    self._outer += features.T @ features

  def mean(self):
    """(dim,) float64 mean of the features seen."""
    if self.count < 1:
      raise ValueError('FeatureStats.mean: no features added yet')
    return self._sum / self.count

  def cov(self):
    """(dim, dim) float64 unbiased covariance (divides by n - 1, as numpy.cov and the FID tool)."""
    if self.count < 2:
      raise ValueError(f'FeatureStats.cov: needs at least 2 features, has {self.count}')
    mu = self._sum / self.count
    return (self._outer - self.count * np.outer(mu, mu)) / (self.count - 1)
