"""Evaluation metrics: PSNR, SSIM (against skimage), colorfulness, Frechet distance, feature
statistics, and pytorch-fid's InceptionV3 (weights converter, weights file, numerics, features).

The Inception weights are random at the real shapes; the torch names are rebuilt here from the
module's own variables by the torch naming rule, so no torch is needed.
"""
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.metrics

from disco_jax.evaluation import metrics
from disco_jax.models import inception
from disco_jax.weights import inception as inception_weights


def _images(seed, shape):
  return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Image metrics
# ------------------------------------------------------------------------------------------------

def test_psnr_matches_numpy():
  a, b = _images(0, (2, 8, 9, 3)), _images(1, (2, 8, 9, 3))
  got = np.asarray(jax.jit(metrics.psnr)(a, b))
  mse = ((a.astype(np.float64) - b) ** 2).reshape(2, -1).mean(axis=1)
  np.testing.assert_allclose(got, 10 * np.log10(1 / mse), rtol=1e-5)
  assert got.shape == (2,)


def _structured(seed, h, w):
  """Smooth gradients plus edges plus a little noise: an image with real structure for SSIM."""
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  rng = np.random.default_rng(seed)
  img = np.stack([xx, yy, (xx + yy > 0.8).astype(float)], axis=-1)
  return np.clip(img + 0.05 * rng.normal(size=img.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize('pair', ['random', 'structured'])
def test_ssim_matches_skimage(pair):
  if pair == 'random':
    a, b = _images(2, (2, 32, 32, 3)), _images(3, (2, 32, 32, 3))
    b[1] = np.clip(a[1] + 0.1 * (b[1] - 0.5), 0, 1)  # a second pair that is similar, not unrelated
  else:
    a = np.stack([_structured(4, 48, 40), _structured(5, 48, 40)])
    b = np.clip(a + 0.08 * np.random.default_rng(6).normal(size=a.shape), 0, 1).astype(np.float32)
  got = np.asarray(jax.jit(metrics.ssim)(a, b))
  want = [skimage.metrics.structural_similarity(
      x, y, channel_axis=-1, data_range=1, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False) for x, y in zip(a, b)]
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_ssim_of_identical_images_is_one_and_too_small_raises():
  a = _images(7, (1, 16, 16, 3))
  np.testing.assert_allclose(metrics.ssim(a, a), [1.0], atol=1e-5)
  with pytest.raises(ValueError, match='smaller than the 11x11 window'):
    metrics.ssim(a[:, :10], a[:, :10])


def test_colorfulness_by_hand():
  # Two pixels, values chosen so that [0, 255] is exact: (255, 0, 0) and (0, 0, 0) ...
  rgb = np.array([[[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]], np.float32)  # (1, 1, 2, 3)
  # rg = |R - G| = (255, 0); yb = |(R + G) / 2 - B| = (127.5, 0).
  # std(rg) = 127.5, std(yb) = 63.75; mean(rg) = 127.5, mean(yb) = 63.75.
  sigma = np.sqrt(127.5 ** 2 + 63.75 ** 2)
  mu = np.sqrt(127.5 ** 2 + 63.75 ** 2)
  np.testing.assert_allclose(metrics.colorfulness(rgb), [sigma + 0.3 * mu], rtol=1e-6)
  # ... and |.| matters: (0, 255, 255) gives rg = 255 but (R + G) / 2 - B = -127.5 -> yb = 127.5.
  rgb2 = np.array([[[[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]], np.float32)
  np.testing.assert_allclose(jax.jit(metrics.colorfulness)(rgb2),
                             [1.3 * np.sqrt(127.5 ** 2 + 63.75 ** 2)], rtol=1e-6)
  # Grey images have no colour.
  np.testing.assert_allclose(metrics.colorfulness(np.full((1, 3, 3, 3), 0.4)), [0.0], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Frechet distance and feature statistics
# ------------------------------------------------------------------------------------------------

def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
  rng = np.random.default_rng(8)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert isinstance(got, float)
  np.testing.assert_allclose(got, want, rtol=1e-9)


def test_frechet_distance_of_a_distribution_with_itself_is_zero():
  x = np.random.default_rng(9).normal(size=(200, 16)) @ np.random.default_rng(10).normal(
      size=(16, 16))
  mu, cov = x.mean(axis=0), np.cov(x, rowvar=False)
  assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-6 * np.trace(cov)
  # A singular covariance (fewer samples than dimensions) still gives a finite answer.
  y = np.random.default_rng(11).normal(size=(5, 16))
  assert np.isfinite(metrics.frechet_distance(mu, cov, y.mean(0), np.cov(y, rowvar=False)))


def test_feature_stats_matches_numpy_and_ignores_masked_rows():
  rng = np.random.default_rng(12)
  batches = [rng.normal(size=(6, 8)).astype(np.float32) for _ in range(3)]
  masks = [np.ones(6, bool), np.array([1, 1, 0, 1, 0, 1], bool), None]
  stats = metrics.FeatureStats(dim=8)
  for f, m in zip(batches, masks):
    # Padded rows hold garbage; the mask must keep it out.
    stats.update(np.where(m[:, None], f, 1e6) if m is not None else f, mask=m)
  kept = np.concatenate([f if m is None else f[m] for f, m in zip(batches, masks)]).astype(
      np.float64)
  assert stats.count == len(kept) == 16
  np.testing.assert_allclose(stats.mean(), kept.mean(axis=0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats.cov(), np.cov(kept, rowvar=False), rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match=r'expected features \(n, 8\)'):
    stats.update(np.zeros((2, 7)))
  with pytest.raises(ValueError, match='at least 2'):
    metrics.FeatureStats(dim=8).cov()


# ------------------------------------------------------------------------------------------------
# InceptionV3
# ------------------------------------------------------------------------------------------------

# The torch naming rule, written out independently of the converter: torch's BN 'weight' is our
# 'scale', its running stats our batch_stats.
_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}


def _module_shapes():
  init = lambda: inception.InceptionV3().init(jax.random.key(0),
                                               jnp.zeros((1, 299, 299, 3), jnp.float32))
  return flax.traverse_util.flatten_dict(jax.eval_shape(init))


@pytest.fixture(scope='module')
def state_dict():
  """A pytorch-fid-style state dict with random weights, plus keys the converter must skip."""
  rng = np.random.default_rng(13)
  sd = {}
  for path, leaf in _module_shapes().items():
    key = '.'.join(path[1:-1] + (_TORCH_LEAF[path[-1]],))
    shape = leaf.shape
    if path[-1] == 'kernel':
      h, w, ci, co = shape
      # He-scaled so activations stay O(1) through ~20 layers and the features are informative.
      sd[key] = (rng.standard_normal((co, ci, h, w)) * np.sqrt(2 / (ci * h * w))).astype(
          np.float32)
    elif path[-1] in ('scale', 'var'):
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if path[-1] == 'scale':
      sd[key.replace('.weight', '.num_batches_tracked')] = np.array(7, np.int64)
  sd['fc.weight'] = np.zeros((1008, 2048), np.float32)
  sd['fc.bias'] = np.zeros((1008,), np.float32)
  return sd


@pytest.fixture(scope='module')
def variables(state_dict):
  return inception_weights.inception_params_from_state_dict(state_dict)


def test_state_dict_has_the_torchvision_names(state_dict):
  # Spot checks of names and torch shapes, so the naming rule is not only tested against itself.
  assert state_dict['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3)
  assert state_dict['Mixed_6b.branch7x7_2.conv.weight'].shape == (128, 128, 1, 7)
  assert state_dict['Mixed_7c.branch_pool.conv.weight'].shape == (192, 2048, 1, 1)
  assert state_dict['Mixed_7b.branch3x3dbl_3b.bn.running_var'].shape == (384,)
  convs = [k for k in state_dict if k.endswith('.conv.weight')]
  assert len(convs) == 94  # torchvision Inception3 without AuxLogits
  n_params = sum(v.size for k, v in state_dict.items() if not k.startswith('fc.') and
                 not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
  # torchvision's inception_v3 has 27,161,264 parameters; less AuxLogits (3,326,696) and its
  # 1000-way fc (2,049,000) leaves the trunk up to pool3.
  assert n_params == 27_161_264 - 3_326_696 - 2_049_000


def test_converter_maps_layouts(state_dict, variables):
  params, stats = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(params['Mixed_5b']['branch5x5_2']['conv']['kernel'],
                                state_dict['Mixed_5b.branch5x5_2.conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['Mixed_6e']['branch1x1']['bn']['scale'],
                                state_dict['Mixed_6e.branch1x1.bn.weight'])
  np.testing.assert_array_equal(params['Conv2d_4a_3x3']['bn']['bias'],
                                state_dict['Conv2d_4a_3x3.bn.bias'])
  np.testing.assert_array_equal(stats['Mixed_7a']['branch3x3_2']['bn']['mean'],
                                state_dict['Mixed_7a.branch3x3_2.bn.running_mean'])
  np.testing.assert_array_equal(stats['Mixed_7a']['branch3x3_2']['bn']['var'],
                                state_dict['Mixed_7a.branch3x3_2.bn.running_var'])


def test_converter_lists_every_problem(state_dict):
  bad = dict(state_dict)
  del bad['Mixed_5c.branch1x1.conv.weight']
  bad['AuxLogits.conv0.conv.weight'] = np.zeros((128, 768, 1, 1), np.float32)
  bad['Mixed_6a.branch3x3.bn.running_var'] = np.zeros((383,), np.float32)
  with pytest.raises(ValueError) as e:
    inception_weights.inception_params_from_state_dict(bad)
  msg = str(e.value)
  assert 'missing Mixed_5c.branch1x1.conv.weight (expected shape (64, 256, 1, 1))' in msg
  assert 'unexpected key AuxLogits.conv0.conv.weight' in msg
  assert 'Mixed_6a.branch3x3.bn.running_var has shape (383,), expected (384,)' in msg


def test_weights_file_round_trip_cli_and_missing_file(tmp_path, state_dict, variables):
  path = tmp_path / 'inception_fid.msgpack'
  inception_weights.save_inception(path, variables)
  loaded = inception_weights.load_inception(str(path))
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)

  # The CLI from an .npz of the state dict (no torch needed) writes the same file.
  npz = tmp_path / 'sd.npz'
  np.savez(npz, **state_dict)
  out = tmp_path / 'cli.msgpack'
  inception_weights.main(['--pytorch-fid', str(npz), '--out', str(out)])
  assert out.read_bytes() == path.read_bytes()

  with pytest.raises(FileNotFoundError) as e:
    inception_weights.load_inception(str(tmp_path / 'nope.msgpack'))
  assert inception_weights.PYTORCH_FID_URL in str(e.value)
  assert ('python -m disco_jax.weights.inception --pytorch-fid pt_inception-2015-12-05-6726825d.pth '
          '--out inception_fid.msgpack') in str(e.value)

  wrong = {'params': dict(variables['params']), 'batch_stats': variables['batch_stats']}
  del wrong['params']['Mixed_7c']
  with pytest.raises(ValueError, match='missing params/Mixed_7c/branch1x1/conv/kernel'):
    inception_weights.save_inception(tmp_path / 'bad.msgpack', wrong)


def test_basic_conv2d_matches_numpy():
  rng = np.random.default_rng(14)
  x = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)
  w = rng.normal(size=(4, 3, 1, 3)).astype(np.float32)  # torch OIHW: a 1x3 conv, padding (0, 1)
  gamma, beta = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
  mean, var = rng.normal(size=4), rng.uniform(0.5, 1.5, 4)
  module = inception.BasicConv2d(4, (1, 3), padding=(0, 1))
  got = module.apply({'params': {'conv': {'kernel': w.transpose(2, 3, 1, 0)},
                                 'bn': {'scale': gamma, 'bias': beta}},
                      'batch_stats': {'bn': {'mean': mean, 'var': var}}}, x)
  xp = np.pad(x[0].astype(np.float64), ((0, 0), (1, 1), (0, 0)))  # (5, 8, 3)
  conv = np.zeros((5, 6, 4))
  for i in range(5):
    for j in range(6):
      conv[i, j] = np.einsum('wc,ocw->o', xp[i, j:j + 3], w[:, :, 0, :])
  want = np.maximum((conv - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0)
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


def test_pools_exclude_padding_like_pytorch_fid():
  x = np.random.default_rng(15).normal(size=(1, 4, 5, 2)).astype(np.float32)
  want = np.zeros_like(x)
  for i in range(4):
    for j in range(5):
      win = x[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]  # real pixels only
      want[0, i, j] = win.mean(axis=(0, 1))
  np.testing.assert_allclose(inception.avg_pool_3x3_exclude_pad(x), want, rtol=1e-5, atol=1e-6)
  # Corners average 4 pixels, not 9: the difference from torchvision's count_include_pad=True.
  np.testing.assert_allclose(want[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)), rtol=1e-6)


def test_inception_features(variables):
  # One jit, batch 2, at a size that is neither 299 nor square, so the resize runs too.
  rgb = np.stack([_structured(16, 64, 48), _images(17, (64, 48, 3))])
  features = np.asarray(jax.jit(inception.inception_features)(variables, rgb))
  assert features.shape == (2, inception.FEATURE_DIM)
  assert np.all(np.isfinite(features))
  assert np.all(features >= 0)  # an average of ReLU outputs
  assert np.abs(features[0] - features[1]).max() > 1e-3 * np.abs(features).max()


@pytest.mark.parametrize('max_pool', [False, True])
def test_mixed_7c_pools_with_max_and_mixed_7b_with_average(max_pool):
  # pytorch-fid's FIDInceptionE_2 (Mixed_7c) max-pools in its pool branch; E_1 (Mixed_7b) averages.
  x = jnp.zeros((1, 4, 4, 8), jnp.float32)
  init = lambda x: inception.InceptionE(max_pool=max_pool).init(jax.random.key(0), x)
  prims = {str(e.primitive) for e in jax.make_jaxpr(init)(x).jaxpr.eqns}
  assert ('reduce_window_max' in prims) == max_pool
  assert ('reduce_window_sum' in prims) != max_pool
