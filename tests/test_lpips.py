"""LPIPS (AlexNet, v0.1): the Flax network against an independent numpy reference on weights
files the test writes with torchvision's and lpips' key names; the converter's errors; the heads
shipped from the lpips wheel."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from disco_jax.models import lpips as lpips_net
from disco_jax.weights import lpips as lpips_weights
from disco_jax.weights import torch_file

# torchvision alexnet().features: (index, out, in, kernel) of each conv.
_ALEX = ((0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3))


def _alexnet_state_dict(rng):
  """A torchvision-named AlexNet state dict with random He-scaled weights (OIHW), classifier too
  (which the converter must ignore)."""
  sd = {}
  for i, o, c, k in _ALEX:
    sd[f'features.{i}.weight'] = (rng.normal(size=(o, c, k, k)) * np.sqrt(2 / (c * k * k))
                                  ).astype(np.float32)
    sd[f'features.{i}.bias'] = rng.normal(0, 0.1, o).astype(np.float32)
  sd['classifier.1.weight'] = np.zeros((4, 9216), np.float32)
  return sd


def _heads_state_dict(rng):
  return {f'lin{l}.model.1.weight': rng.uniform(0, 1, (1, o, 1, 1)).astype(np.float32)
          for l, (_, o, _, _) in enumerate(_ALEX)}


# --- the numpy reference: NCHW, float64, written from lpips' and torchvision's definitions ---

def _np_conv(x, w, b, stride, pad):
  """torch Conv2d: x (B, C, H, W), w (O, C, k, k) -> (B, O, H', W'), by explicit patch sums."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  k = w.shape[-1]
  ho = (x.shape[2] - k) // stride + 1
  wo = (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for dy in range(k):
    for dx in range(k):
      patch = x[:, :, dy:dy + stride * ho:stride, dx:dx + stride * wo:stride]  # (B, C, ho, wo)
      out += np.einsum('bchw,oc->bohw', patch, w[:, :, dy, dx])
  return out + b[None, :, None, None]


def _np_pool(x):
  """torch MaxPool2d(3, 2) on (B, C, H, W)."""
  ho, wo = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
  return np.max([x[:, :, dy:dy + 2 * ho:2, dx:dx + 2 * wo:2]
                 for dy in range(3) for dx in range(3)], axis=0)


def _np_lpips(alex, heads, img0, img1):
  """lpips.LPIPS(net='alex', version='0.1')(img0, img1, normalize=True) for (B, H, W, 3) in [0, 1]."""
  shift = np.array([-.030, -.088, -.188])[None, :, None, None]
  scale = np.array([.458, .448, .450])[None, :, None, None]

  def features(img):
    h = ((2 * img.transpose(0, 3, 1, 2).astype(np.float64) - 1) - shift) / scale
    feats = []
    for n, (i, _, _, k) in enumerate(_ALEX):
      if n in (1, 2):
        h = _np_pool(h)
      stride, pad = (4, 2) if n == 0 else (1, k // 2)
      h = np.maximum(_np_conv(h, alex[f'features.{i}.weight'].astype(np.float64),
                              alex[f'features.{i}.bias'].astype(np.float64), stride, pad), 0)
      feats.append(h)
    return feats

  total = 0
  for l, (f0, f1) in enumerate(zip(features(img0), features(img1))):
    n0 = f0 / (np.sqrt(np.sum(f0 ** 2, axis=1, keepdims=True)) + 1e-10)
    n1 = f1 / (np.sqrt(np.sum(f1 ** 2, axis=1, keepdims=True)) + 1e-10)
    w = heads[f'lin{l}.model.1.weight'].astype(np.float64)[0, :, 0, 0]
    total = total + np.einsum('bchw,c->bhw', (n0 - n1) ** 2, w).mean(axis=(1, 2))
  return total


@pytest.fixture(scope='module')
def weights_files(tmp_path_factory):
  """(alexnet .npz, heads .npz, converted .msgpack, both state dicts): random weights under the
  key names of torchvision's alexnet-owt-7be5be79.pth and lpips' v0.1 alex.pth."""
  root = tmp_path_factory.mktemp('lpips')
  rng = np.random.default_rng(0)
  alex, heads = _alexnet_state_dict(rng), _heads_state_dict(rng)
  np.savez(root / 'alexnet.npz', **alex)
  np.savez(root / 'heads.npz', **heads)
  out = root / 'lpips.msgpack'
  lpips_weights.main(['--alexnet', str(root / 'alexnet.npz'), '--heads', str(root / 'heads.npz'),
                      '--out', str(out)])
  return root / 'alexnet.npz', root / 'heads.npz', out, alex, heads


def test_flax_lpips_matches_the_numpy_reference(weights_files):
  _, _, out, alex, heads = weights_files
  variables = lpips_weights.load_lpips(str(out))
  rng = np.random.default_rng(1)
  img0 = rng.uniform(0, 1, (3, 64, 48, 3)).astype(np.float32)
  # Pairs from identical to unrelated: a near copy, a blurred-ish mix and an independent image.
  img1 = np.stack([np.clip(img0[0] + rng.normal(0, 0.02, img0[0].shape), 0, 1),
                   0.5 * img0[1] + 0.5 * rng.uniform(0, 1, img0[1].shape),
                   rng.uniform(0, 1, img0[2].shape)]).astype(np.float32)
  got = np.asarray(jax.jit(lpips_net.LPIPS().apply)(variables, img0, img1))
  want = _np_lpips(alex, heads, img0, img1)
  assert got.shape == (3,) and np.all(want > 0) and want[0] < want[1] < want[2]
  # float32 (XLA) against float64: rounding in convolutions of up to 3456 terms, measured 7e-7
  # relative here; 1e-5 leaves room for another accumulation order, while a wrong layout, padding
  # or pool moves the distances by percents.
  np.testing.assert_allclose(got, want, rtol=1e-5)
  same = np.asarray(lpips_net.LPIPS().apply(variables, img0, img0))
  np.testing.assert_array_equal(same, 0.0)


def test_too_small_images_are_refused(weights_files):
  variables = lpips_weights.load_lpips(str(weights_files[2]))
  x = jnp.zeros((1, 30, 64, 3))
  with pytest.raises(ValueError, match='at least 31 px'):
    lpips_net.LPIPS().apply(variables, x, x)


def test_converter_lists_missing_and_misshaped_keys(weights_files, tmp_path, capsys):
  alex_path, heads_path, _, alex, heads = weights_files
  broken = dict(alex)
  del broken['features.3.bias']
  broken['features.6.weight'] = broken['features.6.weight'][:, :100]
  np.savez(tmp_path / 'alex_bad.npz', **broken)
  bad_heads = {k: v for k, v in heads.items() if not k.startswith('lin4')}
  np.savez(tmp_path / 'heads_bad.npz', **bad_heads)
  with pytest.raises(SystemExit) as e:
    lpips_weights.main(['--alexnet', str(tmp_path / 'alex_bad.npz'), '--heads',
                        str(tmp_path / 'heads_bad.npz'), '--out', str(tmp_path / 'x.msgpack')])
  msg = str(e.value)
  assert 'missing features.3.bias (expected shape (192,))' in msg
  assert 'features.6.weight has shape (384, 100, 3, 3), expected (384, 192, 3, 3)' in msg
  assert 'missing lin4.model.1.weight (expected shape (1, 256, 1, 1))' in msg
  assert not (tmp_path / 'x.msgpack').exists()
  # The heads and the trunk given the wrong way round: every key is named missing.
  with pytest.raises(SystemExit, match='missing features.0.weight'):
    lpips_weights.main(['--alexnet', str(heads_path), '--heads', str(alex_path),
                        '--out', str(tmp_path / 'x.msgpack')])
  with pytest.raises(SystemExit, match='no such file'):
    lpips_weights.main(['--alexnet', str(tmp_path / 'absent.pth'), '--out', str(tmp_path / 'x')])


def test_load_lpips_names_the_file_and_how_to_get_it(tmp_path, weights_files):
  with pytest.raises(FileNotFoundError) as e:
    lpips_weights.load_lpips(str(tmp_path / 'lpips.msgpack'))
  assert lpips_weights.ALEXNET_URL in str(e.value) and 'python -m disco_jax.weights.lpips' in str(
      e.value)
  variables = lpips_weights.load_lpips(str(weights_files[2]))
  variables['params']['lin2'] = variables['params']['lin2'][:5]
  with pytest.raises(ValueError, match=r'lin2 has shape \(5,\), expected \(384,\)'):
    lpips_weights.save_lpips(str(tmp_path / 'bad.msgpack'), variables['params'])


def test_the_shipped_heads_are_lpips_v01_alex():
  """disco_jax/assets holds lpips' v0.1 AlexNet heads (BSD-2-Clause, licence beside it): read
  with our torch-free reader, every head has its layer's width and is non-negative, as lpips'
  training clamps them."""
  heads = torch_file.read_state_dict(lpips_weights.vendored_heads())
  assert sorted(heads) == [f'lin{l}.model.1.weight' for l in range(5)]
  for l, (_, o, _, _) in enumerate(_ALEX):
    w = heads[f'lin{l}.model.1.weight']
    assert w.shape == (1, o, 1, 1) and w.min() >= 0 and w.max() > 0
  params = lpips_weights.params_from_state_dicts(_alexnet_state_dict(np.random.default_rng(0)),
                                                 heads)
  np.testing.assert_array_equal(params['lin0'], heads['lin0.model.1.weight'][0, :, 0, 0])
