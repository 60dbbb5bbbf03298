"""The device mesh and how arrays are laid out on it.

One mesh ('data', 'fsdp') over all devices of all processes. The batch is split over both axes.
Parameters (and their optimizer state) are replicated, except that with fsdp > 1 the rule table
shards large convolution kernels along their output channels over 'fsdp', so each device holds
1/fsdp of them and XLA gathers them for use.
"""
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
# (regex on the '/'-joined path, minimum size): kernels big enough to be worth sharding. Leaves
# whose last axis is not divisible by the fsdp size stay replicated.
FSDP_RULES = ((r'(^|/)kernel$', 1 << 18),)


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp} must divide the number of devices {len(devices)}')
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _spec(path: str, shape, fsdp: int) -> P:
  if fsdp > 1 and shape:
    for pattern, min_size in FSDP_RULES:
      if re.search(pattern, path) and np.prod(shape) >= min_size and shape[-1] % fsdp == 0:
        return P(*([None] * (len(shape) - 1) + ['fsdp']))
  return P()


def fetch(tree):
  """Host (numpy) copies of jit outputs that are replicated over the mesh. `jax.device_get`
  refuses arrays spanning other processes' devices; each process holds a full copy of these."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def gather(tree, mesh: Mesh):
  """Host copies of `tree`'s arrays, however sharded over `mesh`; every process must call it."""
  return fetch(jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree))


def tree_shardings(mesh: Mesh, abstract_tree):
  """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs) by the rules."""
  fsdp = mesh.shape['fsdp']

  def leaf(path, x):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
    return NamedSharding(mesh, _spec(name, tuple(getattr(x, 'shape', ())), fsdp))

  return jax.tree_util.tree_map_with_path(leaf, abstract_tree)
