import flax.linen
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax.models import layers


def test_conv_transpose_matches_pytorch_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 4, 2)).astype(np.float32)
  w_torch = rng.normal(size=(2, 5, 4, 4)).astype(np.float32)  # (in, out, kh, kw)
  bias = rng.normal(size=(5,)).astype(np.float32)
  want = np.zeros((1, 6 + 2, 8 + 2, 5))  # one spare row/col each side for index -1
  for iy in range(3):
    for ix in range(4):
      for ky in range(4):
        for kx in range(4):
          # out[2 iy - 1 + ky, 2 ix - 1 + kx] += in[iy, ix] W[:, :, ky, kx]
          want[0, 2 * iy + ky, 2 * ix + kx] += x[0, iy, ix] @ w_torch[:, :, ky, kx]
  want = want[:, 1:-1, 1:-1] + bias
  params = {'params': {'kernel': w_torch.transpose(2, 3, 0, 1), 'bias': bias}}
  got = layers.ConvTranspose(5).apply(params, jnp.asarray(x))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_stride2_conv_pads_one_on_every_side():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0].set(1.0)  # picks the top-left neighbour
  y = layers.conv2d(x, kernel, stride=2)
  # Output (0, 0) sits on input (0, 0): its top-left neighbour is padding; (1, 1) -> input (1, 1).
  np.testing.assert_allclose(y[0, :, :, 0], [[0, 0], [0, 5]])


@pytest.mark.parametrize('shape,stride', [((2, 136, 128, 3), 1), ((1, 259, 262, 2), 2),
                                          ((1, 20, 24, 3), 1)])
def test_conv_kernel_gradient_is_the_exact_sum(shape, stride):
  """The kernel gradient of `conv2d`, summed over bands of output rows on large images (the first
  two shapes band, with a short last band; the third does not), against the sum written out in
  float64, within 1e-5 of the largest entry (float32 rounding over ~35000 products). The input
  gradient is XLA's own and must be unchanged."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(3, 3, shape[-1], 4)).astype(np.float32)
  ho, wo = -(-shape[1] // stride), -(-shape[2] // stride)
  dy = rng.normal(size=(shape[0], ho, wo, 4)).astype(np.float32)
  dx, dkernel = jax.vjp(lambda x, k: layers.conv2d(x, k, stride), x, kernel)[1](dy)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
  want = np.zeros(kernel.shape)
  for i in range(3):
    for j in range(3):
      seen = padded[:, i:i + stride * ho:stride, j:j + stride * wo:stride]
      want[i, j] = np.einsum('bhwc,bhwk->ck', seen, dy)
  np.testing.assert_allclose(dkernel, want, rtol=0, atol=1e-5 * np.abs(want).max())
  plain = lambda x: jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_array_equal(dx, jax.vjp(plain, x)[1](dy)[0])


def _inputs_of(jaxpr, var):
  """Every equation that `var` of the flat `jaxpr` is computed from."""
  made_by = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  found, todo = [], [var]
  while todo:
    eqn = made_by.get(todo.pop())
    if eqn is not None and all(eqn is not e for e in found):
      found.append(eqn)
      todo += [v for v in eqn.invars if isinstance(v, jax.extend.core.Var)]
  return found


@pytest.mark.parametrize('shape', [(1, 8, 8, 3), (1, 128, 128, 2)])  # single sum, banded sum
def test_conv_input_gradient_waits_for_the_kernel_gradient(shape):
  """In `conv2d`'s backward pass the input gradient is computed from the kernel gradient too (its
  value unchanged), which keeps XLA from running the chain of input gradients first and leaving
  every kernel gradient, with the arrays it reads, for the end of the step (bench/NOTES.md)."""
  x, kernel = jnp.ones(shape), jnp.ones((3, 3, shape[-1], 4))
  jaxpr = jax.make_jaxpr(lambda x, k, dy: jax.vjp(layers.conv2d, x, k)[1](dy))(
      x, kernel, jnp.ones(shape[:3] + (4,))).jaxpr
  dx = jaxpr.outvars[0]
  convs = [e.outvars[0].aval.shape for e in _inputs_of(jaxpr, dx)
           if e.primitive.name == 'conv_general_dilated']
  assert shape in convs, convs
  assert kernel.shape in convs, f'the input gradient does not wait for the kernel gradient: {convs}'


def test_banded_kernel_gradient_with_the_batch_sharded_over_4_devices():
  """The banded sum under jit with the batch split over a 4-device mesh (the kernel gradient is
  then also summed across devices) equals one device's within 1e-5 of the largest entry."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 136, 128, 3)).astype(np.float32)  # 136 x 128 outputs: banded
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  loss = lambda x, k: jnp.sum(jnp.sin(layers.conv2d(x, k)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('data',))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  got = jax.jit(jax.grad(loss, 1))(sharded, kernel)
  want = jax.jit(jax.grad(loss, 1))(x, kernel)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize('shape', [(2, 16, 12, 3), (1, 7, 9, 2)])
def test_max_pool_2x2_is_flax_max_pool_with_its_gradient(shape):
  """Bit-identical values and gradients, odd sizes floored, ties included: post-ReLU zeros make
  whole windows tie, and the gradient then goes to the window's first element (torch's rule)."""
  rng = np.random.default_rng(0)
  x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
  x[0, 0, :2, 0] = x[0, 1, 0, 0] = 1.5  # a positive tie in the first window
  flax_pool = lambda x: flax.linen.max_pool(x, (2, 2), strides=(2, 2))
  y, vjp = jax.vjp(layers.max_pool_2x2, x)
  want_y, want_vjp = jax.vjp(flax_pool, x)
  dy = rng.normal(size=y.shape).astype(np.float32)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_array_equal(vjp(dy)[0], want_vjp(dy)[0])
  assert vjp(dy)[0][0, 0, 0, 0] == dy[0, 0, 0, 0] and vjp(dy)[0][0, 0, 1, 0] == 0


def test_batchnorm_follows_pytorch():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)) * 2 + 1
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.key(1), x)
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  xn = np.asarray(x).reshape(-1, 4)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 4),
                             (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5), atol=1e-5)
  stats = updates['batch_stats']
  np.testing.assert_allclose(stats['mean'], 0.1 * xn.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * xn.var(0, ddof=1), rtol=1e-5)
  y_eval = bn.apply({'params': variables['params'], 'batch_stats': stats}, x)
  np.testing.assert_allclose(y_eval, (x - stats['mean']) / np.sqrt(stats['var'] + 1e-5),
                             atol=1e-5)


def test_spectral_norm_eval_uses_stored_vectors_and_training_iterates():
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 3))
  conv = layers.SNConv(4)
  variables = conv.init(jax.random.key(1), x)
  kernel = variables['params']['kernel']
  mat = np.asarray(kernel).reshape(-1, 4).T
  u, v = variables['spectral']['u'], variables['spectral']['v']
  sigma = float(u @ mat @ v)
  want = layers.conv2d(x, kernel / sigma) + variables['params']['bias']
  np.testing.assert_allclose(conv.apply(variables, x), want, atol=1e-5)
  # Training-mode forwards refresh u and v; they converge to the top singular vectors.
  for _ in range(30):
    _, upd = conv.apply(variables, x, update=True, mutable=['spectral'])
    variables = {'params': variables['params'], 'spectral': upd['spectral']}
  u, v = variables['spectral']['u'], variables['spectral']['v']
  np.testing.assert_allclose(float(u @ mat @ v), np.linalg.svd(mat, compute_uv=False)[0],
                             rtol=1e-4)
  # No gradient flows through u and v, but it does through the kernel inside sigma.
  grad = jax.grad(lambda p: jnp.sum(conv.apply({'params': p, 'spectral': variables['spectral']},
                                               x, update=True, mutable=['spectral'])[0]))(
      variables['params'])
  assert np.all(np.isfinite(grad['kernel'])) and float(jnp.abs(grad['kernel']).sum()) > 0


def _saved(capsys, f, *args):
  """What the backward pass of `f` keeps, as jax prints it: one 'dtype[shape] description' a line."""
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(f, *args)
  return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize('slope', [0.0, 0.2])
def test_relu_and_leaky_relu_are_flax_with_the_gradient_from_the_output(capsys, slope):
  """Values and gradients bit-identical to flax's, at 0, -0, +-inf and NaN too; and the backward
  pass of a convolution then activation keeps only the activation's output (with the convolution's
  input), where flax's also keeps the convolution's output or a mask and a zero array of its size."""
  x = np.array([-2.0, -0.5, -0.0, 0.0, 1e-30, 0.7, 3.0, np.nan, -np.inf, np.inf], np.float32)
  ours = layers.relu if slope == 0 else lambda x: layers.leaky_relu(x, slope)
  flax_act = flax.linen.relu if slope == 0 else lambda x: flax.linen.leaky_relu(x, slope)
  y, vjp = jax.vjp(ours, x)
  want_y, want_vjp = jax.vjp(flax_act, x)
  dy = np.linspace(-1, 1, x.size).astype(np.float32)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_array_equal(vjp(dy)[0], want_vjp(dy)[0])

  image, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  kept = _saved(capsys, lambda x, k: jnp.sum(ours(layers.conv2d(x, k))), image, kernel)
  assert len(kept) == 3 and 'f32[2,8,8,3]' in kept[0] and 'f32[3,3,3,4]' in kept[1], kept
  assert 'f32[2,8,8,4]' in kept[2] and '_rectify' in kept[2], kept
  flax_kept = _saved(capsys, lambda x, k: jnp.sum(flax_act(layers.conv2d(x, k))), image, kernel)
  assert len(flax_kept) > 3, flax_kept
  with pytest.raises(ValueError, match='slope must be positive'):
    layers.leaky_relu(x, 0.0)


def test_conv_of_parts_is_the_conv_of_their_concatenation_without_keeping_it(capsys):
  """A tuple input: the same values and gradients as the concatenation's, bit for bit, and the
  backward pass keeps the parts, not a concatenated copy of them."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 10, 12, 3)).astype(np.float32)
  b = rng.normal(size=(2, 10, 12, 5)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 8, 4)).astype(np.float32)
  dy = rng.normal(size=(2, 10, 12, 4)).astype(np.float32)
  y, vjp = jax.vjp(lambda a, b, k: layers.conv2d((a, b), k), a, b, kernel)
  want_y, want_vjp = jax.vjp(lambda a, b, k: layers.conv2d(jnp.concatenate([a, b], -1), k),
                             a, b, kernel)
  np.testing.assert_array_equal(y, want_y)
  for got, want in zip(vjp(dy), want_vjp(dy)):
    np.testing.assert_array_equal(got, want)
  kept = _saved(capsys, lambda a, b, k: jnp.sum(layers.conv2d((2 * a, 2 * b), k)), a, b, kernel)
  assert not any('f32[2,10,12,8]' in line for line in kept), kept
  params = layers.Conv(4).init(jax.random.key(0), (a, b))['params']
  assert params['kernel'].shape == (3, 3, 8, 4)
