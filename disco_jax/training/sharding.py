"""The device mesh and how arrays are laid out on it.

One mesh ('data', 'fsdp') over all devices of all processes, in the interconnect's order
(`mesh_utils`): on a TPU slice each 'fsdp' group is a block of ICI neighbours; over several slices
'data' spans the slices (DCN carries only the gradient reduction) and 'fsdp' stays within one. The
batch is split over both axes. Parameters (and their optimizer state) are replicated, except that
with fsdp > 1 the rule table shards large kernels (convolutions, dense layers, the attention
projections) over 'fsdp' along their last axis that it divides, so each device holds 1/fsdp of
them and XLA gathers them for use.
"""
import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
# (regex on the '/'-joined path, minimum size): kernels big enough to be worth sharding; smaller
# ones cost a gather more than their memory. 'kernel' is every convolution and Dense layer,
# 'in_proj_kernel' the attention's fused query/key/value projection. Leaves with no axis the fsdp
# size divides stay replicated.
FSDP_RULES = ((r'(^|/)(in_proj_)?kernel$', 1 << 18),)


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp} must divide the number of devices {len(devices)}')
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices == 1:
    grid = mesh_utils.create_device_mesh((len(devices) // fsdp, fsdp), devices,
                                         allow_split_physical_axes=True)
  else:
    per_slice = len(devices) // slices
    if per_slice % fsdp:
      raise ValueError(f'config.mesh.fsdp={fsdp} must divide the {per_slice} devices of one slice '
                       f'({slices} slices): parameter gathers stay on ICI, within a slice')
    grid = mesh_utils.create_hybrid_device_mesh((per_slice // fsdp, fsdp), (slices, 1), devices,
                                                allow_split_physical_axes=True)
  return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _spec(path: str, shape, fsdp: int) -> P:
  if fsdp > 1 and shape:
    for pattern, min_size in FSDP_RULES:
      if re.search(pattern, path) and np.prod(shape) >= min_size:
        # The last axis fsdp divides: a convolution's or Dense layer's output channels where
        # they can be (each device then computes from whole input channels).
        for axis in reversed(range(len(shape))):
          if shape[axis] % fsdp == 0:
            return P(*[('fsdp' if a == axis else None) for a in range(len(shape))])
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
