"""Training-mode parity with the official PyTorch model on `shared/parity/train_*.npz`.

`parity.train_stages` runs the real training loss and gradient (`DiscoTask.loss` under
`jax.value_and_grad`, as the train step does) with the fixtures' anchors, and maps the results back
to the official names and layouts. Tolerances (the issue's, never widened):
- float32, matmul precision 'highest': each gradient within max(4 f32_noise, 1e-5) max|grad64|
  (f32_noise is how far torch's own float32 gradient is from its float64 one: the deep BatchNorm
  and spectral-norm stacks are ill-conditioned at batch 2); global and per-module gradient norms
  within 1e-3 relative of the float64 norms; loss terms within 1e-5 relative; buffers within 1e-5.
- float64 (jax_enable_x64, float64 variables): loss within 1e-9 relative; gradients within 1e-9 of
  max|grad64| (tighter than the issue's 1e-7: two float64 runs of one computation agree to ~1e-9,
  the fixtures' README) given the official encoding of positions. The official code makes that
  encoding in float32 even in its float64 run, with torch's float32 sin/cos, which round a few
  near-halfway values the other way from correctly rounded ones (32 of the 1024 entries of a 4x4
  grid differ by 1 ulp from ours); at batch 2 with synthetic weights the backbone and RefineNet
  gradients amplify that 6e-8 to up to 3.2e-7 relative (train_a). So the float64 gradient test
  takes the official `pos` from the fixture itself, or from an eval fixture of the same token grid,
  and skips (saying so) where neither has it.
Every `train_*.npz` in DISCO_PARITY_DIR is checked, whatever its size, batch or weight seed.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax import parity
from disco_jax.models import disco
from disco_jax.training import losses
from disco_jax.weights import convert, vgg19
from tests.conftest import make_state_dict, parity_dir

LOSS_TERMS = ('loss', 'ce_modeler', 'ce_generator', 'ab_l1')
# The official model's trainable parameters: all of them but the frozen SPixNet (fixtures' README).
TRAINABLE_PARAMS = 40_794_242


def _cases():
  return sorted(parity_dir().glob('train_*.npz')) or [pytest.param(None, marks=pytest.mark.skip(
      reason=f'no train_*.npz parity fixtures in {parity_dir()} (set DISCO_PARITY_DIR)'))]


_case_ids = lambda p: getattr(p, 'stem', 'none')


_state_dict = make_state_dict


@contextlib.contextmanager
def _float64():
  """jax_enable_x64 for the duration, restored after: the other tests run in float32."""
  before = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', before)


@functools.cache
def _run(case, x64):
  """train_stages on fixture `case` in float32 (precision 'highest') or float64; cached."""
  fx = dict(np.load(case))
  variables = convert.variables_from_state_dict(_state_dict(case.parent,
                                                            int(fx['state_dict_seed'])))
  args = fx['gray'], fx['ab'], fx['anchor_mask'], fx['anchor_label']
  if not x64:
    with jax.default_matmul_precision('highest'):
      return fx, parity.train_stages(variables, *args)
  with _float64():
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables)
    return fx, parity.train_stages(variables, *args)


def _grad_errors(fx, out):
  """{name: max |ours - grad64| / max |grad64|} over the fixture's gradients."""
  errors = {}
  for key in fx:
    if key.startswith('grad64/'):
      name = key[len('grad64/'):]
      ref = fx[key]
      assert out['grads'][name].shape == ref.shape, name
      errors[name] = float(np.abs(out['grads'][name] - ref).max() / np.abs(ref).max())
  assert len(errors) >= 20
  return errors


def _norm(arrays):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in arrays)))


def _check_norms(fx, out, rtol):
  """The global and per-module gradient norms against the fixture's float64 ones."""
  np.testing.assert_allclose(_norm(out['grads'].values()), fx['grad64_global_norm'], rtol=rtol)
  for key in [k for k in fx if k.startswith('grad64_norm/')]:
    module = key.split('/')[1]
    got = _norm(g for n, g in out['grads'].items() if n.split('.')[0] == module)
    np.testing.assert_allclose(got, fx[key], rtol=rtol, err_msg=f'gradient norm of {module}')


def test_official_names_round_trip(parity):
  """The inverse mapping gives back every official entry (but the untracked BN counters)."""
  sd = _state_dict(parity, 0)
  back = convert.state_dict_from_variables(convert.variables_from_state_dict(sd))
  assert set(back) == {k for k in sd if not k.endswith('.num_batches_tracked')}
  for name, value in back.items():
    assert value.shape == sd[name].shape, name
    np.testing.assert_array_equal(value, sd[name], err_msg=name)


@pytest.mark.parametrize('case', _cases(), ids=_case_ids)
def test_float32_training_matches_official(case, parity):
  fx, out = _run(case, False)
  # The training forward's own labels (nearest bin of the pooled GT colour) are the fixture's.
  np.testing.assert_array_equal(out['gt_label'], fx['anchor_label'])
  # Every trainable parameter has a gradient, under its official name and shape; SPixNet none.
  sd = _state_dict(parity, int(fx['state_dict_seed']))
  assert set(out['grads']) == {k for k in sd if not convert.is_buffer(k)
                               and not k.startswith('segnet.')}
  assert sum(g.size for g in out['grads'].values()) == TRAINABLE_PARAMS
  for name, err in _grad_errors(fx, out).items():
    tol = max(4 * float(fx[f'f32_noise/{name}']), 1e-5)
    assert err <= tol, f'{case.name} gradient {name}: {err:.3g} > {tol:.3g}'
  _check_norms(fx, out, rtol=1e-3)
  for term in LOSS_TERMS:
    np.testing.assert_allclose(out[term], fx[f'{term}_64'], rtol=1e-5, err_msg=term)
  for key in [k for k in fx if k.startswith('after/')]:
    name = key[len('after/'):]
    np.testing.assert_allclose(out['after'][name], fx[key], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('case', _cases(), ids=_case_ids)
def test_float64_loss_matches_official(case):
  fx, out = _run(case, True)
  assert out['grads']['mid_word_prj.weight'].dtype == np.float64  # nothing fell back to float32
  for term in LOSS_TERMS:
    np.testing.assert_allclose(out[term], fx[f'{term}_64'], rtol=1e-9, err_msg=term)


@pytest.mark.parametrize('case', _cases(), ids=_case_ids)
def test_float64_gradients_match_official(case, monkeypatch):
  """With the official encoding of positions, the float64 training gradient is the official one to
  1e-9 relative, every checked tensor and module (see the module docstring)."""
  fx = dict(np.load(case))
  grid = (fx['gray'].shape[1] // 16, fx['gray'].shape[2] // 16)
  official_pos = [fx['pos']] if 'pos' in fx else []
  official_pos += [p for p in (np.load(c)['pos'] for c in sorted(case.parent.glob('case_*.npz')))
                   if p.shape[:2] == grid]
  if not official_pos:
    pytest.skip(f'{case.name} holds no `pos`, and no case_*.npz has a {grid} token grid to take the '
                "official float32 encoding from (ours differs from torch's float32 sin/cos by 1 ulp "
                'in a few entries, which the ill-conditioned float64 gradient amplifies past 1e-7)')
  variables = convert.variables_from_state_dict(_state_dict(case.parent,
                                                            int(fx['state_dict_seed'])))
  variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables)
  monkeypatch.setattr(disco, 'sine_position_encoding', lambda h, w, d: jnp.asarray(official_pos[0]))
  parity.gradient_fn.cache_clear()  # retrace with the substituted encoding
  try:
    with _float64():
      out = parity.train_stages(variables, fx['gray'], fx['ab'], fx['anchor_mask'],
                                fx['anchor_label'])
  finally:
    parity.gradient_fn.cache_clear()
  for name, err in _grad_errors(fx, out).items():
    assert err <= 1e-9, f'{case.name} gradient {name}: {err:.3g} > 1e-9'
  _check_norms(fx, out, rtol=1e-9)
  for term in LOSS_TERMS:
    np.testing.assert_allclose(out[term], fx[f'{term}_64'], rtol=1e-12, err_msg=term)


def _vgg_loss_and_grad(dtype):
  """The perceptual term's value and gradient w.r.t. ab_pred, random VGG19 weights, in `dtype`."""
  rng = np.random.default_rng(0)
  sd = {}
  for idx, (ci, co) in zip((0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28),
                           ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                            (256, 256), (256, 256), (256, 512), (512, 512), (512, 512),
                            (512, 512), (512, 512))):
    # He-scaled, so activations stay O(1) down to relu5_1 and every layer counts.
    sd[f'features.{idx}.weight'] = (rng.standard_normal((co, ci, 3, 3)) * np.sqrt(2 / (9 * ci))
                                    ).astype(np.float32)
    sd[f'features.{idx}.bias'] = (0.1 * rng.standard_normal(co)).astype(np.float32)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), vgg19.params_from_torchvision(sd))
  # Rounded to float32 first: both runs see the same inputs.
  gray, ab_pred, ab_gt = (rng.uniform(-0.6, 0.6, (2, 32, 48, c)).astype(np.float32).astype(dtype)
                          for c in (1, 2, 2))
  fn = lambda ab: losses.perceptual_loss(params, 'torch', gray, ab, ab_gt, jnp.dtype(dtype))
  with jax.default_matmul_precision('highest'):
    loss, grad = jax.jit(jax.value_and_grad(fn))(ab_pred)
  return float(loss), np.asarray(grad)


def test_vgg_perceptual_gradient_float32_matches_float64():
  """The training step's other term, VGG19's perceptual loss (the fixtures replace it by an ab L1):
  its float32 gradient w.r.t. ab_pred against a float64 run of the same code. Observed 5e-6 of
  max |grad| (loss 1.4e-7 relative); bounds 10x that: 5e-5 and 1e-6."""
  loss32, grad32 = _vgg_loss_and_grad(np.float32)
  with _float64():
    loss64, grad64 = _vgg_loss_and_grad(np.float64)
  assert grad64.dtype == np.float64
  assert np.abs(grad32 - grad64).max() <= 5e-5 * np.abs(grad64).max()
  np.testing.assert_allclose(loss32, loss64, rtol=1e-6)
