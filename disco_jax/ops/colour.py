"""Colour maths: sRGB <-> CIE Lab, the network normalisations and the 313 ab bins.

Everything here is a pure function. The Lab conversions accept numpy or jax arrays and return the
same kind, so the input pipeline (numpy) and the model (jax) share one implementation.
"""
import functools
import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np

L_CENTRE = 50.0  # gray = (L - 50) / 50
L_SCALE = 50.0
AB_SCALE = 110.0  # ab_n = ab / 110
NUM_BINS = 313

# OpenCV's float BGR<->Lab constants (sRGB primaries, D65 white), so that images converted here
# match the ones the official code and the parity fixtures were made with.
RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                     [0.212671, 0.715160, 0.072169],
                     [0.019334, 0.119193, 0.950227]])
XYZ2RGB = np.array([[3.240479, -1.53715, -0.498535],
                     [-0.969256, 1.875991, 0.041556],
                     [0.055648, -0.204043, 1.057311]])
WHITE_D65 = np.array([0.950456, 1.0, 1.088754])
LAB_EPS = 0.008856
LAB_KAPPA = 903.3
GAMUT_TOL = 1e-4  # linear-RGB overshoot counted as in gamut: float32 noise, far below 8 bits
GAMUT_STEPS = 8  # chroma-scale bisection steps: 2^-8 of a chroma of 100 is 0.4 ab, below a JND


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def _srgb_to_linear(c, xp):
  safe = xp.maximum(c, 0.04045)  # keeps pow() and its gradient finite on the unused branch
  return xp.where(c <= 0.04045, c / 12.92, ((safe + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c, xp):
  safe = xp.maximum(c, 0.0031308)
  return xp.where(c <= 0.0031308, 12.92 * c, 1.055 * safe ** (1 / 2.4) - 0.055)


def rgb_to_lab(rgb):
  """sRGB in [0, 1] `(..., 3)` -> Lab `(..., 3)` with L in [0, 100], as OpenCV's float BGR2Lab."""
  xp = _xp(rgb)
  lin = _srgb_to_linear(rgb, xp)
  xyz = (lin @ xp.asarray(RGB2XYZ.T, dtype=rgb.dtype)) / xp.asarray(WHITE_D65, dtype=rgb.dtype)
  f = xp.where(xyz > LAB_EPS, xp.cbrt(xp.maximum(xyz, LAB_EPS)), 7.787 * xyz + 16.0 / 116.0)
  y = xyz[..., 1]
  lum = xp.where(y > LAB_EPS, 116.0 * f[..., 1] - 16.0, LAB_KAPPA * y)
  a = 500.0 * (f[..., 0] - f[..., 1])
  b = 200.0 * (f[..., 1] - f[..., 2])
  return xp.stack([lum, a, b], axis=-1).astype(rgb.dtype)


@functools.cache
def _uint8_to_linear():
  """`(256,)` float32: `_srgb_to_linear` of every 8-bit value v / 255."""
  return _srgb_to_linear(np.arange(256, dtype=np.float32) / 255.0, np)


def lightness_uint8(rgb: np.ndarray) -> np.ndarray:
  """uint8 sRGB `(..., 3)` -> L `(...)` float32: `rgb_to_lab(rgb / 255)[..., 0]` to the bit (tested
  over the RGB cube) for a fraction of the cost: the gamma from a 256-entry table, one cube root.

  The matrix product is rgb_to_lab's own: BLAS may round a product with a 1-column matrix
  differently, and L would then move by an ulp. Y's white is 1, so there is no division."""
  y = (_uint8_to_linear()[rgb] @ RGB2XYZ.T.astype(np.float32))[..., 1]
  f = np.cbrt(np.maximum(y, LAB_EPS))
  return np.where(y > LAB_EPS, 116.0 * f - 16.0, LAB_KAPPA * y)


def _lab_to_linear(lab, xyz2rgb, white):
  """Lab `(..., 3)` -> linear RGB `(..., 3)` before any clipping, with one converter's constants.

  Cubes are products and the 3x3 matrix is sums of products: numpy's float power and its matmul
  over a length-3 axis are several times slower, and `fit_gamut` runs this once per bisection step.
  """
  xp = _xp(lab)
  lum, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
  cube = lambda f: xp.where(f > 0.206893, f * f * f, (f - 16.0 / 116.0) / 7.787)
  f = (lum + 16.0) / 116.0
  low = lum <= LAB_EPS * LAB_KAPPA
  y = xp.where(low, lum / LAB_KAPPA, f * f * f)
  fy = xp.where(low, 7.787 * y + 16.0 / 116.0, f)
  white, m = np.asarray(white).tolist(), np.asarray(xyz2rgb).tolist()  # Python floats keep float32
  xyz = (cube(fy + a / 500.0) * white[0], y * white[1], cube(fy - b / 200.0) * white[2])
  return xp.stack([sum(m[c][k] * xyz[k] for k in range(3)) for c in range(3)], axis=-1)


def lab_to_linear_rgb(lab):
  """Lab `(..., 3)` -> linear sRGB `(..., 3)`, unclipped (out of [0, 1] where out of gamut)."""
  return _lab_to_linear(lab, XYZ2RGB, WHITE_D65)


def lab_to_rgb(lab):
  """Lab `(..., 3)` -> sRGB `(..., 3)` clipped to [0, 1], as OpenCV's float Lab2BGR."""
  xp = _xp(lab)
  return _linear_to_srgb(xp.clip(lab_to_linear_rgb(lab), 0.0, 1.0), xp).astype(lab.dtype)


def _gamut_ok(lin):
  """Linear RGB `(..., 3)` -> `(...)` bool: inside sRGB up to GAMUT_TOL."""
  return np.all((lin >= -GAMUT_TOL) & (lin <= 1.0 + GAMUT_TOL), axis=-1)


def _in_gamut(lab):
  return _gamut_ok(lab_to_linear_rgb(lab))


def _shrink_chroma(sub):
  """Out-of-gamut float32 Lab `(n, 3)` -> the same, ab scaled down by bisection until it fits."""
  lo, hi = np.zeros(len(sub), np.float32), np.ones(len(sub), np.float32)
  for _ in range(GAMUT_STEPS):
    mid = (lo + hi) / 2
    ok = _in_gamut(np.concatenate([sub[:, :1], sub[:, 1:] * mid[:, None]], -1))
    lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
  return np.concatenate([sub[:, :1], sub[:, 1:] * lo[:, None]], -1)


def fit_gamut(lab: np.ndarray) -> np.ndarray:
  """Lab `(..., 3)` with each out-of-gamut colour's chroma scaled down until it fits sRGB.

  Clipping RGB (as cv2 does) shifts lightness; shrinking ab towards grey keeps L and hue, and grey
  (scale 0) always fits for L in [0, 100]. Only the clipped pixels are bisected.
  """
  lab = np.array(lab, np.float32)
  bad = ~_in_gamut(lab)
  if bad.any():
    lab[bad] = _shrink_chroma(lab[bad])
  return lab


def fitted_lab_to_rgb(lab: np.ndarray) -> np.ndarray:
  """`lab_to_rgb(fit_gamut(lab))` for numpy Lab `(..., 3)` -> float32 sRGB `(..., 3)`, the same
  numbers with the linear RGB of the colours already in gamut computed once instead of twice."""
  lab = np.asarray(lab, np.float32)
  lin = lab_to_linear_rgb(lab)
  bad = ~_gamut_ok(lin)
  if bad.any():
    lin[bad] = lab_to_linear_rgb(_shrink_chroma(lab[bad]))
  return _linear_to_srgb(np.clip(lin, 0.0, 1.0), np).astype(np.float32)


def normalise_lab(lab):
  """Lab `(..., 3)` -> (gray `(..., 1)` in [-1, 1], ab_n `(..., 2)` roughly in [-1, 1])."""
  return (lab[..., :1] - L_CENTRE) / L_SCALE, lab[..., 1:] / AB_SCALE


def denormalise_lab(gray, ab_n):
  """Inverse of `normalise_lab`: `(..., 1)`, `(..., 2)` -> Lab `(..., 3)`."""
  xp = _xp(gray) if _xp(ab_n) is np else jnp
  return xp.concatenate([gray * L_SCALE + L_CENTRE, ab_n * AB_SCALE], axis=-1)


# The matrix and white point of the hand-written (Zhang et al. style) converter the official loss
# uses; they differ from OpenCV's in the last digits, and the loss must match the released model's
# training, not the I/O path.
_LOSS_XYZ2RGB = np.array([[3.24048134, -1.53715152, -0.49853633],
                          [-0.96925495, 1.87599, 0.04155593],
                          [0.05564664, -0.20404134, 1.05731107]])
_LOSS_WHITE = np.array([0.95047, 1.0, 1.08883])


def lab_to_rgb_for_loss(gray, ab_n):
  """Differentiable Lab -> RGB of the official perceptual loss.

  gray `(B, H, W, 1)` and ab_n `(B, H, W, 2)` normalised -> RGB `(B, H, W, 3)`. Negative linear RGB is
  clamped to 0 before the gamma; there is no clamp at 1 (as in the official code).
  """
  lin = _lab_to_linear(denormalise_lab(gray, ab_n), _LOSS_XYZ2RGB, _LOSS_WHITE)
  return _linear_to_srgb(jnp.maximum(lin, 0.0), jnp)


@functools.cache
def _load_data(name):
  with importlib.resources.files('disco_jax').joinpath('assets', name).open('rb') as f:
    return np.load(f)


def bin_centres():
  """The 313 in-gamut ab bin centres `(313, 2)` float32 in ab units, in the logits' order."""
  return _load_data('gamut_pts.npy').astype(np.float32)


def bin_priors():
  """Empirical ImageNet prior of each bin `(313,)` float64, summing to 1."""
  return _load_data('gamut_probs.npy')


def nearest_bin(ab_n):
  """Label of the nearest bin centre: ab_n `(..., 2)` normalised -> `(...)` int32.

  The official encoder soft-encodes over the 5 nearest bins and then takes the argmax, which is
  always the nearest bin, so this is the same function.
  """
  centres = jnp.asarray(bin_centres())
  ab = ab_n * AB_SCALE
  # |ab - c|^2 = |ab|^2 - 2 ab.c + |c|^2; |ab|^2 is constant per pixel and irrelevant to argmin.
  dist = jnp.sum(centres ** 2, -1) - 2.0 * jnp.einsum('...c,qc->...q', ab, centres,
                                                      precision=jax.lax.Precision.HIGHEST)
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def bin_to_ab(labels):
  """Bin labels `(...)` -> normalised ab `(..., 2)` of their centres."""
  return jnp.asarray(bin_centres())[labels] / AB_SCALE


def topk_ab(logits, k=0):
  """Normalised ab of the k-th most probable bin `(..., 2)` from logits `(..., 313)`; k=0 is the mode."""
  order = jnp.argsort(-logits, axis=-1)
  return bin_to_ab(order[..., k])


def class_weights(colorfulness=0.5):
  """Rebalancing weight of each bin `(313,)` float32, with lambda = 1 - colorfulness.

  w_q = 1 / ((1 - lambda) p_q + lambda / Q), scaled so that sum_q p_q w_q = 1.
  """
  if not 0.0 <= colorfulness <= 1.0:
    raise ValueError(f'colorfulness must lie in [0, 1], got {colorfulness}')
  # In float32 arithmetic, as the official code computes them (`ColorLabel`, a float32 prior): the
  # float64 formula rounded to float32 differs by up to 1 ulp in some bins, which the official
  # model's float64 training gradient shows (tests/test_train_parity.py).
  prior = bin_priors().astype(np.float32)
  lam = np.float32(1.0 - colorfulness)
  uniform = np.float32(1.0) / np.float32(NUM_BINS)
  w = np.float32(1.0) / ((np.float32(1.0) - lam) * prior + lam * uniform)
  return w / np.sum(prior * w)
