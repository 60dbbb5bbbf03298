"""bench/aot.py: the tiny config's training step compiled for 4 v5e chips, with no TPU here; the
mesh over TPU slices as libtpu describes them."""
import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'bench'))
import aot  # pylint: disable=g-import-not-at-top,wrong-import-position


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason='libtpu is not installed: pip install -r requirements-tpu.txt')

# Prints, per row of the ('data', 'fsdp') mesh, each device's (slice, x, y).
MESH_SCRIPT = """
import json, sys
sys.path.insert(0, 'bench')
import aot
from disco_jax.training import sharding
for topology, slices, fsdp in (('v5e:2x2', 2, 4), ('v5e:2x4', 1, 2), ('v4:2x2x1', 1, 4)):
  mesh = sharding.make_mesh(fsdp, aot.topology_devices(topology, slices))
  print(json.dumps([[[getattr(d, 'slice_index', 0), *d.coords[:2]] for d in row]
                    for row in mesh.devices]))
"""


@needs_libtpu
def test_mesh_keeps_fsdp_on_ici_neighbours_and_data_across_slices():
  proc = subprocess.run([sys.executable, '-c', MESH_SCRIPT], capture_output=True, text=True,
                        check=False, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two_slices, one_slice, v4 = [json.loads(l) for l in proc.stdout.splitlines()
                               if l.startswith('[')]
  # 2 slices of 2x2, fsdp 4: each row is one whole slice, the 'data' axis goes across them.
  assert [sorted({s for s, _, _ in row}) for row in two_slices] == [[0], [1]]
  for row in two_slices:  # the fsdp group in ring order: each chip beside the next (ICI)
    xy = [(x, y) for _, x, y in row]
    assert sorted(xy) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(xy, xy[1:] + xy[:1]))
  # One 2x4 slice, fsdp 2: each pair of chips is a pair of neighbours.
  assert len(one_slice) == 4
  for row in one_slice:
    (_, x0, y0), (_, x1, y1) = row
    assert abs(x0 - x1) + abs(y0 - y1) == 1, one_slice
  # v4 as TPU VMs run it, one megacore device per chip: its 4 chips, each once.
  assert len(v4) == 1 and sorted((x, y) for _, x, y in v4[0]) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@needs_libtpu
def test_tiny_train_step_compiles_for_v5e_2x2():
  # A process of its own: libtpu's environment must be set before jax loads, and this one's jax
  # already has its 4 CPU devices.
  proc = subprocess.run(
      [sys.executable, str(REPO / 'bench' / 'aot.py'), '--topology', 'v5e:2x2', '--batch', '8',
       '--size', '64', '--variant', 'tiny', '--cases', 'train'],
      capture_output=True, text=True, check=False, cwd=REPO, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (record,) = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]
  chip = aot.CHIPS['v5e']
  assert record['chips'] == 4 and record['batch'] == 8 and record['dtype'] == 'float32'
  assert record['cpu_kernels'] == 'auto' and not record['cpu_kernels_used']  # TPUs: plain ops
  assert record['flops_per_chip'] > 1e9 and record['bytes_accessed_per_chip'] > 1e8
  assert record['hbm_bytes_per_chip'] == chip['hbm_bytes']
  assert 0 < record['peak_bytes_per_chip'] < record['hbm_bytes_per_chip'] and record['fits']
  assert record['peak_bytes_per_chip'] == (
      record['argument_bytes_per_chip'] + record['output_bytes_per_chip']
      - record['alias_bytes_per_chip'] + record['temp_bytes_per_chip'])
  # The batch is split over the 4 chips: the gradients are summed across them.
  assert record['all_reduce'] > 0 and record['all_gather'] == 0
  step = max(record['flops_per_chip'] / chip['peak_flops'],
             record['bytes_accessed_per_chip'] / chip['hbm_bandwidth'])
  assert record['roofline_step_s'] == pytest.approx(step, rel=1e-9)
  assert 0 < record['mfu_ceiling'] <= 1 and record['compile_s'] > 0
  assert record['recompute_share'] == 0 and record['hfu_ceiling'] == record['mfu_ceiling']
  assert record['images_per_s_per_chip'] == pytest.approx(2 / step, rel=1e-9)


def test_collective_counts_read_sync_and_async_ops():
  hlo = ('  %a = f32[4] all-reduce(f32[4] %x), replica_groups={}\n'
         '  %b = (f32[4], f32[8]) all-gather-start(f32[4] %y)\n'
         '  %c = f32[8] all-gather-done((f32[4], f32[8]) %b)\n'
         '  %d = f32[2] reduce-scatter(f32[8] %z)\n  %e = f32[4] all-reduce-start(f32[4] %x)\n')
  assert aot.collective_counts(hlo) == {'all_reduce': 2, 'all_gather': 1, 'reduce_scatter': 1}


def test_remat_recompute_share_is_the_extra_forward():
  args = argparse.Namespace(variant='tiny', size=64, batch=8, dtype='float32', remat=True,
                            cpu_kernels='auto', fsdp=1, slices=1)
  share = aot.recompute_share('train', args, chips=4)
  # Recomputing (most of) the forward adds up to one forward to forward + backward (~3 forwards).
  assert 0.05 < share < 0.34, share
