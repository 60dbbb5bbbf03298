"""The mixed-precision and rematerialisation switches of config.model (`dtype`, `remat`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import disco as disco_configs
from configs import spixnet as spixnet_configs
from disco_jax.training import tasks


def _batch(size=32, n=2):
  rgb = jax.random.uniform(jax.random.key(0), (n, size, size, 3))
  gray = jnp.mean(rgb, -1, keepdims=True) * 2 - 1
  ab = (rgb[..., :2] - 0.5) * 0.8
  return {'gray': gray, 'ab': ab}


def _loss_and_grads(task, variables, batch):
  variables = dict(variables)
  params = variables.pop('params')
  fn = jax.jit(jax.value_and_grad(
      lambda p: task.loss(p, variables, batch, jax.random.key(1), True), has_aux=True))
  (loss, (terms, _, _)), grads = fn(params)
  return float(loss), terms, grads


def _tiny_task(module, **model):
  config = module.get_config('tiny')
  config.model.update(model)
  return tasks.SpixTask(config) if config.task == 'spixnet' else tasks.DiscoTask(config)


@pytest.mark.parametrize('module', [spixnet_configs, disco_configs], ids=['spixnet', 'disco'])
def test_remat_computes_the_same_loss_and_gradients(module):
  # Dropout off: with it, this tiny colorizer's gradient is ill-conditioned (measured: a 1e-6
  # input perturbation moves it by 1.6%), so rounding differences between two compilations would
  # dominate the comparison.
  model = {'dropout': 0.0} if module is disco_configs else {}
  plain, remat = _tiny_task(module, **model), _tiny_task(module, remat=True, **model)
  variables = plain.init_variables(0)
  loss, _, grads = _loss_and_grads(plain, variables, _batch())
  loss_r, _, grads_r = _loss_and_grads(remat, variables, _batch())
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  # Recomputation repeats the same float32 operations; XLA may fuse them differently, and
  # BatchNorm over a 2-image batch amplifies that rounding (measured 2.3e-4 on the colorizer).
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
  diff = np.linalg.norm(flat(grads_r) - flat(grads)) / np.linalg.norm(flat(grads))
  assert diff < 1e-3, diff


def test_remat_needs_less_memory():
  """XLA's buffer assignment of the compiled gradient: fewer temporary bytes with remat (on the
  full-size colorizer the benchmark measures it: bench/NOTES.md)."""
  batch = _batch(size=64, n=4)
  temp = []
  for remat in (False, True):
    task = _tiny_task(spixnet_configs, remat=remat)
    variables = dict(task.init_variables(0))
    params = variables.pop('params')
    grad = jax.jit(jax.grad(lambda p: task.loss(p, variables, batch, jax.random.key(1), True)[0]))
    temp.append(grad.lower(params).compile().memory_analysis().temp_size_in_bytes)
  assert temp[1] < temp[0], temp


def test_bfloat16_computes_in_bf16_and_keeps_float32_state():
  # Dropout off, as in the remat test: with it this tiny model's gradient is ill-conditioned.
  f32 = _tiny_task(disco_configs, dropout=0.0)
  bf16 = _tiny_task(disco_configs, dropout=0.0, dtype='bfloat16')
  variables = f32.init_variables(0)
  batch = _batch()
  loss, terms, grads = _loss_and_grads(f32, variables, batch)
  loss_b, terms_b, grads_b = _loss_and_grads(bf16, variables, batch)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads_b))
  assert all(v.dtype == jnp.float32 for v in terms_b.values())
  # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation); through ~20 layers the
  # loss of this tiny model moves by well under 2%.
  np.testing.assert_allclose(loss_b, loss, rtol=2e-2)
  cos = lambda a, b: float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))
  flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(g)])
  # The colour modeler's gradient (transformer + head, from its CE term) keeps its direction
  # (measured cosine 0.99996). The CNNs' gradients at this random initialisation do not compare:
  # BatchNorm over a few 4x4 maps makes them ill-conditioned (a 1e-6 input change moves the f32
  # gradient by 1.6%), so bf16's 2^-9 rounding turns them by a lot (measured cosines 0.2-0.9).
  for module in ('wildpath', 'mid_word_prj'):
    assert cos(flat(grads[module]), flat(grads_b[module])) > 0.999, module
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads_b))
  v = dict(variables)
  params = v.pop('params')
  jaxpr = str(jax.make_jaxpr(lambda p: bf16.loss(p, v, batch, jax.random.key(1), True)[0])(params))
  assert 'bf16' in jaxpr and 'conv_general_dilated' in jaxpr


def test_unknown_dtype_is_refused():
  from disco_jax.models import disco
  config = disco_configs.get_config('tiny')
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match='config.model.dtype'):
    disco.from_config(config.model)


def test_matmul_precision_follows_the_platform_and_reaches_the_pooling():
  from disco_jax.models import disco
  from disco_jax.ops import superpixel
  config = disco_configs.get_config('tiny')  # matmul_precision 'auto'
  assert disco.from_config(config.model, platform='cpu').matmul_precision == 'highest'
  assert disco.from_config(config.model, platform='gpu').matmul_precision == 'highest'
  assert disco.from_config(config.model, platform='tpu').matmul_precision == 'default'
  config.model.matmul_precision = 'high'
  assert disco.from_config(config.model, platform='tpu').matmul_precision == 'high'
  config.model.matmul_precision = 'fast'
  with pytest.raises(ValueError, match='config.model.matmul_precision'):
    disco.from_config(config.model)
  feat, assoc = jnp.ones((1, 32, 32, 3)), jnp.ones((1, 32, 32, 9)) / 9
  for name, shown in (('highest', '(Precision.HIGHEST, Precision.HIGHEST)'),
                      ('default', '(Precision.DEFAULT, Precision.DEFAULT)')):
    jaxpr = str(jax.make_jaxpr(lambda f, a: superpixel.diffuse(
        superpixel.pool(f, a, precision=name)[0], a, precision=name))(feat, assoc))
    assert jaxpr.count(f'precision={shown}') == 2, jaxpr
  # The model's field reaches both einsums: two fewer HIGHEST dots in its forward with 'default'.
  sizes = {k: config.model[k] for k in ('spix_width', 'backbone_width', 'refine_width', 'd_model',
                                        'num_layers', 'num_heads', 'ffn_dim')}

  def highest_dots(precision):
    m = disco.DISCO(**sizes, num_anchors=3, matmul_precision=precision)
    v = jax.eval_shape(lambda: disco.init_variables(m, 0))
    gray, ab = jnp.zeros((1, 32, 32, 1)), jnp.zeros((1, 32, 32, 2))
    return str(jax.make_jaxpr(lambda v: m.apply(v, gray, ab, rngs={'anchors': jax.random.key(0)}))(
        v)).count('precision=(Precision.HIGHEST, Precision.HIGHEST)')

  assert highest_dots('highest') - highest_dots('default') == 2
