"""bench/aot.py: the tiny config's training step compiled for 4 v5e chips, with no TPU here."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'bench'))
import aot  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu is not installed: pip install -r requirements-tpu.txt')
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
  assert record['images_per_s_per_chip'] == pytest.approx(2 / step, rel=1e-9)


def test_collective_counts_read_sync_and_async_ops():
  hlo = ('  %a = f32[4] all-reduce(f32[4] %x), replica_groups={}\n'
         '  %b = (f32[4], f32[8]) all-gather-start(f32[4] %y)\n'
         '  %c = f32[8] all-gather-done((f32[4], f32[8]) %b)\n'
         '  %d = f32[2] reduce-scatter(f32[8] %z)\n  %e = f32[4] all-reduce-start(f32[4] %x)\n')
  assert aot.collective_counts(hlo) == {'all_reduce': 2, 'all_gather': 1, 'reduce_scatter': 1}
