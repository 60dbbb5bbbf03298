"""The FSDP rule table and the CPU mesh (TPU meshes: tests/test_aot.py)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from disco_jax.training import sharding


def test_fsdp_rules_shard_convolutions_dense_and_attention_kernels():
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  tree = {'repnet': {'conv4_3_2': {'kernel': sds(3, 3, 512, 512), 'bias': sds(512)}},
          'wildpath': {'layers_0': {'self_attn': {'in_proj_kernel': sds(512, 1536),
                                                  'in_proj_bias': sds(1536)},
                                    'linear1': {'kernel': sds(512, 2048)}}},
          'mid_word_prj': {'kernel': sds(1024, 313)},  # 313 bins: the input axis is split
          'odd': {'kernel': sds(513, 513)},  # no axis divisible by 4: replicated
          'small': {'kernel': sds(64, 64)}}  # under the size rule: replicated
  specs = jax.tree_util.tree_map(lambda s: s.spec,
                                 sharding.tree_shardings(sharding.make_mesh(4), tree))
  assert specs == {
      'repnet': {'conv4_3_2': {'kernel': P(None, None, None, 'fsdp'), 'bias': P()}},
      'wildpath': {'layers_0': {'self_attn': {'in_proj_kernel': P(None, 'fsdp'),
                                              'in_proj_bias': P()},
                                'linear1': {'kernel': P(None, 'fsdp')}}},
      'mid_word_prj': {'kernel': P('fsdp', None)},
      'odd': {'kernel': P()}, 'small': {'kernel': P()}}


def test_cpu_mesh_keeps_the_device_order():
  devices = jax.devices()
  mesh = sharding.make_mesh(2, devices)
  assert mesh.shape == {'data': len(devices) // 2, 'fsdp': 2}
  assert list(mesh.devices.flat) == devices
  assert list(np.asarray(sharding.make_mesh(1, devices[:1]).devices).flat) == devices[:1]
