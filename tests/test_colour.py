import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.ops import colour
from tests import lab_reference


def test_lab_round_trip_within_1e4():
  rgb = np.random.default_rng(0).random((4096, 3)).astype(np.float32)
  back = colour.lab_to_rgb(colour.rgb_to_lab(rgb))
  np.testing.assert_allclose(back, rgb, atol=1e-4)


def test_lab_gives_the_reference_values_in_numpy_and_jax():
  rgb = lab_reference.RGB.astype(np.float32)
  for lab in (colour.rgb_to_lab(rgb), np.asarray(colour.rgb_to_lab(jnp.asarray(rgb)))):
    np.testing.assert_allclose(lab, lab_reference.LAB, atol=lab_reference.ATOL)
  lab = lab_reference.LAB.astype(np.float32)
  for back in (colour.lab_to_rgb(lab), np.asarray(colour.lab_to_rgb(jnp.asarray(lab)))):
    np.testing.assert_allclose(back, lab_reference.RGB, atol=1e-4)


def test_gamut_fitting_keeps_lightness_and_fits():
  # Out-of-gamut colours: lightness kept, chroma scaled down until linear RGB is within [0, 1].
  lab = np.array([[50.0, 120.0, -120.0], [90.0, -100.0, 100.0], [50.0, 10.0, 10.0]], np.float32)
  fitted = colour.fit_gamut(lab)
  np.testing.assert_array_equal(fitted[:, 0], lab[:, 0])
  np.testing.assert_array_equal(fitted[2], lab[2])  # already in gamut: unchanged
  lin = colour.lab_to_linear_rgb(fitted)
  assert np.all(lin >= -colour.GAMUT_TOL) and np.all(lin <= 1 + colour.GAMUT_TOL)
  assert np.all(np.abs(fitted[:2, 1:]) < np.abs(lab[:2, 1:]))


def test_normalisation_round_trip():
  lab = np.array([[[50.0, 110.0, -55.0]]], np.float32)
  gray, ab = colour.normalise_lab(lab)
  np.testing.assert_allclose(gray, [[[0.0]]])
  np.testing.assert_allclose(ab, [[[1.0, -0.5]]])
  np.testing.assert_allclose(colour.denormalise_lab(gray, ab), lab)


def test_nearest_bin_is_the_brute_force_nearest_centre():
  centres = colour.bin_centres()
  assert centres.shape == (313, 2)
  ab = np.random.default_rng(1).uniform(-1, 1, (500, 2)).astype(np.float32)
  want = np.argmin(((ab[:, None] * 110 - centres[None]) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(colour.nearest_bin(jnp.asarray(ab)), want)
  np.testing.assert_allclose(colour.bin_to_ab(jnp.asarray(want)), centres[want] / 110, rtol=1e-6)


def test_topk_decoding():
  logits = jnp.full((313,), -5.0).at[7].set(3.0).at[100].set(2.0)
  np.testing.assert_allclose(colour.topk_ab(logits, 0), colour.bin_centres()[7] / 110)
  np.testing.assert_allclose(colour.topk_ab(logits, 1), colour.bin_centres()[100] / 110)


def test_class_weights_match_the_spec_ranges():
  prior = colour.bin_priors()
  for colorfulness, lo, hi in ((0.5, 0.097, 6.17), (0.2, 0.18, 3.07)):
    w = colour.class_weights(colorfulness)
    assert abs(np.sum(prior * w) - 1.0) < 1e-5
    assert abs(w.min() - lo) < 0.005 and abs(w.max() - hi) < 0.01
    # Rarer bins get larger weights.
    assert np.all(np.diff(w[np.argsort(prior)]) <= 1e-6)


def test_loss_converter_close_to_opencv_and_differentiable_at_black():
  rgb = np.random.default_rng(2).uniform(0.05, 0.95, (64, 3)).astype(np.float32)
  gray, ab = colour.normalise_lab(colour.rgb_to_lab(rgb))
  got = colour.lab_to_rgb_for_loss(jnp.asarray(gray), jnp.asarray(ab))
  np.testing.assert_allclose(got, rgb, atol=2e-3)  # different rounding of the same matrices
  black = jnp.array([[-1.0]]), jnp.zeros((1, 2))
  grad = jax.grad(lambda a: jnp.sum(colour.lab_to_rgb_for_loss(black[0], a)))(black[1])
  assert np.all(np.isfinite(grad))
