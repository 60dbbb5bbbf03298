"""`config.model.cpu_kernels`: kernels.cpu's custom VJPs on and off compute the same training step,
and off leaves none of them in it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import disco as disco_configs
from disco_jax.kernels import cpu
from disco_jax.models import vgg
from disco_jax.training import tasks, validate

KERNELS = {f.__name__ for f in (cpu.conv3x3, cpu.conv3x3_parts, cpu.max_pool_2x2, cpu.rectify)}
SIZE = 128  # the first level's 128 x 128 outputs take the banded kernel gradient


def _task(cpu_kernels, with_vgg=False):
  """Stage 2 of the tiny config; `with_vgg` adds the VGG19 term (random weights), where the max
  pool is."""
  config = disco_configs.get_config('tiny')
  if not with_vgg:
    return tasks.DiscoTask(config, cpu_kernels=cpu_kernels)
  config.loss.perceptual_weight = 5.0
  vgg_params = jax.jit(lambda: vgg.VGG19Features().init(
      jax.random.key(1), jnp.zeros((1, 32, 32, 3)))['params'])()
  return tasks.DiscoTask(config, vgg_weights=(vgg_params, 'torch'), cpu_kernels=cpu_kernels)


def _batch():
  rng = np.random.default_rng(0)
  return {'gray': jnp.asarray(rng.uniform(-1, 1, (2, SIZE, SIZE, 1)), jnp.float32),
          'ab': jnp.asarray(rng.uniform(-0.4, 0.4, (2, SIZE, SIZE, 2)), jnp.float32)}


def _step(task):
  """The training step's loss, terms and parameter gradients, jitted."""
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  return jax.jit(lambda p, s, b, k: grad_fn(p, s, b, k, True))


@pytest.fixture(scope='module')
def both():
  variables = _task(False).init_variables(0)
  params = variables.pop('params')
  key = jax.random.key(3)
  return {k: _step(_task(k))(params, variables, _batch(), key) for k in (True, False)}


def test_on_and_off_give_the_same_loss_and_gradients(both):
  """Tolerance, float32: the loss within 1e-6 relative (the forward passes are the same ops;
  measured: equal to the bit); each gradient within 1e-5 of its largest entry, the rounding of a
  reduction reordered (the banded kernel gradient sums 8 bands of 2048 positions where XLA sums
  16384 at once; measured: at most 5.5e-6 of the largest entry)."""
  (loss_on, (terms_on, _, _)), grads_on = both[True]
  (loss_off, (terms_off, _, _)), grads_off = both[False]
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
  for name in terms_on:
    np.testing.assert_allclose(terms_on[name], terms_off[name], rtol=1e-6, err_msg=name)
  flat_on = jax.tree_util.tree_leaves_with_path(grads_on)
  for (path, g_on), g_off in zip(flat_on, jax.tree_util.tree_leaves(grads_off)):
    scale = float(np.abs(g_off).max())
    np.testing.assert_allclose(g_on, g_off, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert float(loss_on) > 0 and any(np.abs(g).max() > 0 for _, g in flat_on)


def _custom_vjps(jaxpr):
  """Names of the functions of every custom_vjp_call in `jaxpr` and its sub-jaxprs."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'custom_vjp_call':
      found.add(eqn.params['call_jaxpr'].jaxpr.debug_info.func_name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          found |= _custom_vjps(sub)
  return found


@pytest.mark.parametrize('cpu_kernels', [True, False])
def test_off_leaves_none_of_the_kernels_in_the_training_step(cpu_kernels):
  """The loss as the step differentiates it, and the step itself (forward and backward); traced,
  not compiled."""
  task = _task(cpu_kernels, with_vgg=True)
  variables = jax.eval_shape(lambda: task.init_variables(0))
  params = variables.pop('params')
  args = (params, variables, _batch(), jax.random.key(3))
  forward = _custom_vjps(jax.make_jaxpr(lambda p, s, b, k: task.loss(p, s, b, k, True))(
      *args).jaxpr)
  step = _custom_vjps(jax.make_jaxpr(_step(task))(*args).jaxpr)
  if cpu_kernels:
    assert KERNELS <= forward, forward
  else:
    assert not KERNELS & (forward | step), (forward, step)


def test_auto_follows_the_devices_and_bad_settings_are_named():
  class Device:  # what `wanted` reads of a device
    def __init__(self, platform):
      self.platform = platform

  assert cpu.wanted('auto', jax.devices()) == (jax.devices()[0].platform == 'cpu')
  assert cpu.wanted('auto', [Device('cpu')] * 2) and not cpu.wanted('auto', [Device('tpu')])
  assert cpu.wanted('on', [Device('tpu')]) and not cpu.wanted('off', [Device('cpu')])
  with pytest.raises(ValueError, match='config.model.cpu_kernels'):
    cpu.wanted('yes', [Device('cpu')])
  config = disco_configs.get_config('tiny')
  config.model.cpu_kernels = 'yes'
  with pytest.raises(validate.ConfigError, match=r"model.cpu_kernels='yes'"):
    validate.validate_config(config)
