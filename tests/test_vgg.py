"""VGG19 perceptual loss: weight converters, our weights file, the forward pass and the loss.

Weights are random at the real VGG19 widths (the converters check shapes); images stay tiny.
"""
import functools
import pathlib
import subprocess
import sys

import flax.serialization
import h5py
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax.models import vgg
from disco_jax.weights import vgg19

REPO = pathlib.Path(__file__).resolve().parent.parent
# torchvision vgg19().features: convs at these indices, each followed by a ReLU, and 2x2 max-pools
# at 4, 9, 18, 27; the loss reads the ReLUs at 1, 6, 11, 20, 29.
TORCH_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256),
               12: (256, 256), 14: (256, 256), 16: (256, 256), 19: (256, 512), 21: (512, 512),
               23: (512, 512), 25: (512, 512), 28: (512, 512)}
TORCH_POOLS = (4, 9, 18, 27)
TORCH_TAPS = (1, 6, 11, 20, 29)
# Keras' names for the same convs, in the same order.
KERAS_CONVS = dict(zip(
    ['block1_conv1', 'block1_conv2', 'block2_conv1', 'block2_conv2', 'block3_conv1',
     'block3_conv2', 'block3_conv3', 'block3_conv4', 'block4_conv1', 'block4_conv2',
     'block4_conv3', 'block4_conv4', 'block5_conv1'], TORCH_CONVS))


@pytest.fixture(scope='module')
def state_dict():
  """A torchvision-style VGG19 state dict with random weights, plus keys the converter must skip."""
  rng = np.random.default_rng(0)
  sd = {}
  for idx, (ci, co) in TORCH_CONVS.items():
    # He-scaled, so activations stay O(1) down to relu5_1 and every layer matters in comparisons.
    sd[f'features.{idx}.weight'] = (rng.standard_normal((co, ci, 3, 3)) * np.sqrt(2 / (9 * ci))
                                    ).astype(np.float32)
    sd[f'features.{idx}.bias'] = (0.1 * rng.standard_normal(co)).astype(np.float32)
  sd['features.30.bias'] = np.zeros(512, np.float32)
  sd['classifier.0.weight'] = np.zeros((8, 8), np.float32)
  return sd


@pytest.fixture(scope='module')
def params(state_dict):
  return vgg19.params_from_torchvision(state_dict)


def write_keras_h5(path, state_dict, layout='keras2', drop=(), bad_bias=()):
  """Writes `state_dict`'s convs laid out as Keras' VGG19 notop weights file.

  Root attribute `layer_names`; one group per layer, whose `weight_names` attribute lists its arrays
  as paths inside the group. 'keras2': 'block1_conv1/kernel:0' and 'block1_conv1/bias:0' (a
  subgroup). 'keras1': 'block1_conv1_W_1:0' and 'block1_conv1_b_1:0' (right in the group).
  `drop` leaves layer groups out, `bad_bias` cuts a layer's bias one short.
  """
  layers = ['input_1']
  for b, n in enumerate((2, 2, 4, 4, 4), 1):
    layers += [f'block{b}_conv{i}' for i in range(1, n + 1)] + [f'block{b}_pool']
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = [n.encode() for n in layers]
    f.attrs['backend'] = b'tensorflow'
    f.attrs['keras_version'] = b'2.1.5'
    for layer in layers:
      if layer in drop:
        continue
      group = f.create_group(layer)
      if 'conv' not in layer:
        group.attrs['weight_names'] = np.array([], np.float64)  # as Keras writes weightless layers
        continue
      # block5_conv2..4 come after relu5_1 and must be skipped; any right-shaped weights will do.
      idx = KERAS_CONVS.get(layer, 28)
      kernel = state_dict[f'features.{idx}.weight'].transpose(2, 3, 1, 0)  # OIHW -> HWIO
      bias = state_dict[f'features.{idx}.bias'][:-1 if layer in bad_bias else None]
      names = {'keras2': (f'{layer}/kernel:0', f'{layer}/bias:0'),
               'keras1': (f'{layer}_W_1:0', f'{layer}_b_1:0')}[layout]
      group.attrs['weight_names'] = [n.encode() for n in names]
      group[names[0]], group[names[1]] = kernel, bias


def numpy_reference_features(state_dict, x):
  """torchvision's vgg19().features run literally, in float64: x `(B, H, W, 3)` preprocessed.

  Cross-correlation with padding 1, weight `(O, I, 3, 3)` indexed [o, i, dy, dx]:
  out[y, x, o] = b[o] + sum_{i, dy, dx} w[o, i, dy, dx] * in[y + dy - 1, x + dx - 1, i].
  """
  x = x.astype(np.float64)
  taps = []
  for idx in range(max(TORCH_TAPS) + 1):
    if idx in TORCH_CONVS:
      w = state_dict[f'features.{idx}.weight'].astype(np.float64)
      _, h, wd, _ = x.shape
      padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = state_dict[f'features.{idx}.bias'].astype(np.float64) + sum(
          padded[:, dy:dy + h, dx:dx + wd] @ w[:, :, dy, dx].T
          for dy in range(3) for dx in range(3))
    elif idx in TORCH_POOLS:
      bsz, h, wd, c = x.shape
      x = x.reshape(bsz, h // 2, 2, wd // 2, 2, c).max(axis=(2, 4))
    else:
      x = np.maximum(x, 0.0)
      if idx in TORCH_TAPS:
        taps.append(x)
  return taps


def test_torchvision_weights_forward_matches_numpy_reference(state_dict, params):
  x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  got = vgg.VGG19Features().apply({'params': params}, x)
  want = numpy_reference_features(state_dict, x)
  assert [g.shape for g in got] == [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256),
                                    (2, 4, 4, 512), (2, 2, 2, 512)]
  for g, w in zip(got, want):
    # float32 against a float64 reference through up to 13 layers of ~4600-term sums: relative
    # errors are ~1e-6 (measured below 1e-6 of the largest value); a wrong layout or layer order
    # is off by O(1).
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_torchvision_kernel_layout_on_a_hand_made_kernel(state_dict):
  # conv1_1 output channel 0 copies input channel 2 from one row above, one column right:
  # torch's w[o, i, dy, dx] reads in[y + dy - 1, x + dx - 1], so dy = 0, dx = 2.
  sd = dict(state_dict)
  w = np.zeros((64, 3, 3, 3), np.float32)
  w[0, 2, 0, 2] = 1.0
  sd['features.0.weight'], sd['features.0.bias'] = w, np.zeros(64, np.float32)
  x = np.random.default_rng(2).uniform(size=(1, 16, 16, 3)).astype(np.float32)
  relu1_1 = vgg.VGG19Features().apply({'params': vgg19.params_from_torchvision(sd)}, x)[0]
  np.testing.assert_array_equal(np.asarray(relu1_1)[0, 1:, :-1, 0], x[0, :-1, 1:, 2])
  np.testing.assert_array_equal(np.asarray(relu1_1)[0, 0, :, 0], 0.0)  # zero padding above


def test_torchvision_missing_and_misshaped_keys_are_all_listed(state_dict):
  sd = dict(state_dict)
  del sd['features.0.weight'], sd['features.28.bias']
  sd['features.5.weight'] = sd['features.5.weight'].transpose(2, 3, 1, 0)  # HWIO by mistake
  with pytest.raises(ValueError) as e:
    vgg19.params_from_torchvision(sd)
  for key in ('features.0.weight', 'features.28.bias', 'features.5.weight'):
    assert key in str(e.value)
  assert 'features.0.bias' not in str(e.value)


@pytest.mark.parametrize('layout', ['keras2', 'keras1'])
def test_keras_h5_gives_the_torchvision_params(tmp_path, state_dict, params, layout):
  path = tmp_path / 'vgg19_notop.h5'
  write_keras_h5(path, state_dict, layout)
  got = vgg19.params_from_keras_h5(str(path))
  assert jax.tree.structure(got) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, got, params)


def test_keras_h5_problems_are_all_listed(tmp_path, state_dict):
  path = tmp_path / 'broken.h5'
  write_keras_h5(path, state_dict, drop=('block3_conv2',), bad_bias=('block4_conv1',))
  with pytest.raises(ValueError) as e:
    vgg19.params_from_keras_h5(str(path))
  assert 'block3_conv2' in str(e.value) and 'block4_conv1' in str(e.value)
  assert str(path) in str(e.value)
  garbage = tmp_path / 'garbage.h5'
  garbage.write_bytes(b'not hdf5 at all')
  with pytest.raises(ValueError, match='garbage.h5'):
    vgg19.params_from_keras_h5(str(garbage))


def test_save_load_round_trip(tmp_path, params):
  path = tmp_path / 'vgg19.msgpack'
  vgg19.save_vgg19(str(path), params, 'caffe')
  loaded, mode = vgg19.load_vgg19(str(path))
  assert mode == 'caffe'
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize('path', [None, '', 'does/not/exist/vgg19.msgpack'])
def test_missing_weights_file_says_where_to_get_one(path):
  with pytest.raises(FileNotFoundError) as e:
    vgg19.load_vgg19(path)
  message = str(e.value)
  for needed in ('https://download.pytorch.org/models/vgg19-dcbb9e9d.pth',
                 'https://storage.googleapis.com/tensorflow/keras-applications/vgg19/'
                 'vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5',
                 'python -m disco_jax.weights.vgg19 --torchvision',
                 'python -m disco_jax.weights.vgg19 --keras', 'to 0'):
    assert needed in message
  if path:
    assert path in message


def test_damaged_or_wrong_weights_files_name_the_file_and_problem(tmp_path, params):
  garbage = tmp_path / 'garbage.msgpack'
  garbage.write_bytes(b'\xc1\xff\x00 definitely not msgpack')
  with pytest.raises(ValueError, match='garbage.msgpack'):
    vgg19.load_vgg19(str(garbage))
  # A well-formed file whose conv2_1 has the wrong input width: the shape check names the layer.
  wrong = {k: dict(v) for k, v in params.items()}
  wrong['conv2_1']['kernel'] = np.zeros((3, 3, 32, 128), np.float32)
  path = tmp_path / 'wrong.msgpack'
  path.write_bytes(flax.serialization.msgpack_serialize({'params': wrong, 'preprocess': 'torch'}))
  with pytest.raises(ValueError, match=r'(?s)wrong\.msgpack.*conv2_1/kernel'):
    vgg19.load_vgg19(str(path))


def test_preprocess_modes():
  rgb = jnp.array([[1.0, 0.0, 0.5]])
  np.testing.assert_allclose(
      vgg.preprocess(rgb, 'torch'),
      [[(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]], rtol=1e-6)
  # Caffe: BGR order, 0-255, BGR mean subtracted.
  np.testing.assert_allclose(vgg.preprocess(rgb, 'caffe'),
                             [[127.5 - 103.939, 0 - 116.779, 255 - 123.68]], rtol=1e-6)
  with pytest.raises(ValueError, match='unknown'):
    vgg.preprocess(rgb, 'tf')


@functools.partial(jax.jit, static_argnums=1)
def jit_loss_and_grads(params, mode, pred, gt):
  return jax.value_and_grad(vgg.perceptual_loss, argnums=(2, 3))(params, mode, pred, gt)


def random_images(seed, shape=(2, 16, 16, 3)):
  # Slightly past 1, as RGB built from predicted Lab can be.
  return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, 0.0, 1.05)


@pytest.mark.parametrize('mode', vgg.MODES)
def test_perceptual_loss_is_zero_for_identical_images(params, mode):
  x = random_images(3)
  loss = jax.jit(vgg.perceptual_loss, static_argnums=1)(params, mode, x, x)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert float(loss) == 0.0


def test_perceptual_loss_gradient_reaches_prediction_only(params):
  loss, (g_pred, g_gt) = jit_loss_and_grads(params, 'torch', random_images(4), random_images(5))
  assert float(loss) > 0
  assert bool(jnp.all(jnp.isfinite(g_pred))) and float(jnp.abs(g_pred).max()) > 0
  assert float(jnp.abs(g_gt).max()) == 0.0


def test_perceptual_loss_weights_each_layer(params):
  assert vgg.LAYER_WEIGHTS == (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
  pred, gt = random_images(6), random_images(7)
  features = lambda x: vgg.VGG19Features().apply({'params': params}, vgg.preprocess(x, 'caffe'))
  terms = [float(jnp.mean(jnp.abs(a - b))) for a, b in zip(features(pred), features(gt))]
  want = sum(c * t for c, t in zip((1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0), terms))
  # Every term must count: an unweighted or partial sum would be far off.
  assert min(terms) > 1e-3 * want
  got = float(vgg.perceptual_loss(params, 'caffe', pred, gt))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_perceptual_loss_backward_skips_the_ground_truth(params):
  """The gradient runs VGG19's backward over the prediction only: 13 forward convolutions each
  for prediction and truth, and the backward's convolutions over a batch of B, never 2B."""
  x = random_images(2)
  grad = jax.make_jaxpr(jax.grad(vgg.perceptual_loss, argnums=2), static_argnums=1)(
      params, 'torch', x, x)

  def convs(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == 'conv_general_dilated':
        yield e
      for sub in jax_core.jaxprs_in_params(e.params):
        yield from convs(sub)

  found = list(convs(grad.jaxpr))
  assert all(e.invars[0].aval.shape[0] == x.shape[0] for e in found)
  # 26 forward convolutions; the backward of conv1_1 (input gradient) to conv5_1: 13 more.
  assert len(found) == 26 + 13


def test_cli_converts_a_keras_file(tmp_path, state_dict, params):
  h5 = tmp_path / 'vgg19_notop.h5'
  write_keras_h5(h5, state_dict)
  out = tmp_path / 'vgg19.msgpack'
  result = subprocess.run([sys.executable, '-m', 'disco_jax.weights.vgg19', '--keras', str(h5),
                           '--out', str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  loaded, mode = vgg19.load_vgg19(str(out))
  assert mode == 'caffe'
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_cli_converts_torchvision_weights_without_torch(tmp_path, monkeypatch, state_dict, params):
  # `import torch` fails, installed or not: the state dict is read by weights.torch_file (an .npz of
  # it here; tests/test_torch_file.py covers real torch.save files).
  monkeypatch.setitem(sys.modules, 'torch', None)
  np.savez(tmp_path / 'vgg19.npz', **state_dict)
  vgg19.main(['--torchvision', str(tmp_path / 'vgg19.npz'), '--out', str(tmp_path / 'o.msgpack')])
  loaded, mode = vgg19.load_vgg19(str(tmp_path / 'o.msgpack'))
  assert mode == 'torch'
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
