"""Metric writer files, progress arithmetic, picture helpers and the parameter table."""
import io
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from disco_jax.training import writers


def _events(workdir):
  """(tag, step, value array, plugin name) of every summary in workdir/tensorboard.

  The plugin name, which tells TensorBoard how to show a tag, is written with a tag's first value.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = sorted((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert files, 'no TensorBoard event file'
  found = []
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        found.append((value.tag, event.step, tf.make_ndarray(value.tensor),
                      value.metadata.plugin_data.plugin_name))
  return found


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
  writer = writers.MetricWriter(tmp_path, enabled=True)
  writer.write_scalars(10, {'loss': np.float32(4.25), 'lr': jnp.asarray(2e-4), 'count': 3})
  writer.write_scalars(20, {'loss': float('nan'), 'grad_norm': np.inf, 'neg': -np.inf})
  # Flushed per call: readable before close.
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  writer.close()
  writer.close()  # twice is fine (the trainer closes in a finally)
  assert len(lines) == 2
  first, second = (json.loads(line) for line in lines)  # strict JSON: no bare NaN tokens
  assert first['step'] == 10 and first['loss'] == 4.25 and first['count'] == 3
  assert isinstance(first['count'], int) and math.isclose(first['lr'], 2e-4, rel_tol=1e-6)
  assert abs(first['time'] - time.time()) < 60
  assert second == {'step': 20, 'time': second['time'], 'loss': 'nan', 'grad_norm': 'inf',
                    'neg': '-inf'}
  assert 'NaN' not in lines[1] and 'Infinity' not in lines[1]
  events = _events(tmp_path)
  scalars = {(tag, step): float(value) for tag, step, value, _ in events}
  assert scalars[('loss', 10)] == 4.25 and scalars[('count', 10)] == 3.0
  assert math.isnan(scalars[('loss', 20)])
  assert {plugin for tag, step, _, plugin in events if step == 10} == {'scalars'}
  # A resumed run appends to the same file.
  again = writers.MetricWriter(tmp_path, enabled=True)
  again.write_scalars(30, {'loss': 1.0})
  again.close()
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 3


def test_non_scalar_metric_is_refused(tmp_path):
  writer = writers.MetricWriter(tmp_path, enabled=True)
  with pytest.raises(ValueError, match="'loss' must be a number"):
    writer.write_scalars(1, {'loss': np.ones(3)})
  writer.close()


def test_images_go_to_png_and_tensorboard(tmp_path):
  writer = writers.MetricWriter(tmp_path, enabled=True)
  gradient = np.linspace(0, 1, 20 * 30 * 3, dtype=np.float32).reshape(20, 30, 3)
  solid = np.full((8, 12, 3), 7, np.uint8)
  writer.write_images(120, {'train/samples': gradient, 'solid': solid})
  writer.close()
  png = tmp_path / 'samples' / 'train_samples_00000120.png'
  with Image.open(png) as image:
    assert image.size == (30, 20) and image.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(image), writers.to_uint8(gradient))
  with Image.open(tmp_path / 'samples' / 'solid_00000120.png') as image:
    np.testing.assert_array_equal(np.asarray(image), solid)
  events = {tag: (step, value, plugin) for tag, step, value, plugin in _events(tmp_path)}
  assert set(events) == {'train/samples', 'solid'}
  step, value, plugin = events['train/samples']
  assert step == 120 and plugin == 'images'
  assert list(value[:2]) == [b'30', b'20']  # the images plugin wants width, height, PNGs
  with Image.open(io.BytesIO(value[2])) as image:
    np.testing.assert_array_equal(np.asarray(image), writers.to_uint8(gradient))
  with pytest.raises(ValueError, match=r"'gray' must be an \(H, W, 3\)"):
    writers.MetricWriter(tmp_path, enabled=True).write_images(1, {'gray': np.zeros((4, 4))})


def test_disabled_writer_writes_nothing(tmp_path):
  writer = writers.MetricWriter(tmp_path / 'w', enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  writer.write_images(1, {'x': np.zeros((2, 2, 3), np.uint8)})
  writer.close()
  assert not (tmp_path / 'w').exists()


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_progress_excludes_compilation_and_smooths():
  clock = _Clock()
  progress = writers.Progress(total_steps=600, start_step=100, clock=clock, smoothing=0.5)
  clock.now += 60.0  # steps 101-110, compiling: left out
  line = progress.line(110, {'loss': 4.0}, images_per_step=8)
  assert line.endswith('-- img/s | -- s/step | ETA --')
  assert math.isnan(progress.throughput(110, 8)) and math.isnan(progress.eta_seconds(110))
  clock.now += 10.0  # steps 111-120 at 1 s/step
  assert progress.throughput(120, 8) == 8.0
  clock.now += 5.0  # a repeated step reuses the numbers
  assert progress.eta_seconds(120) == 480.0
  clock.now += 5.0  # steps 121-140 took 10 s: 0.5 s/step, averaged half-half with 1 s/step
  assert progress.eta_seconds(140) == 460 * 0.75
  assert progress.throughput(140, 8) == 8 / 0.75


def test_progress_line_format():
  clock = _Clock()
  progress = writers.Progress(total_steps=600, start_step=0, clock=clock)
  clock.now += 100.0
  progress.line(100, {}, 12)
  clock.now += 0.8125 * 20
  scalars = {'ce_modeler': 2.1, 'loss': 4.2131, 'lr': 2e-4, 'images_per_s': 14.8}
  line = progress.line(120, scalars, images_per_step=12)
  assert line == ('step 120/600 (20.0%) | loss 4.213 ce_modeler 2.1 | lr 2.0e-04 | 14.8 img/s | '
                  '0.81 s/step | ETA 6m30s')


@pytest.mark.parametrize('seconds,text', [(0, '0s'), (59.4, '59s'), (60, '1m00s'), (389, '6m29s'),
                                          (3600, '1h00m00s'), (7627, '2h07m07s'), (-3, '0s')])
def test_format_duration(seconds, text):
  assert writers.format_duration(seconds) == text


def test_image_grid_size_padding_and_placement():
  a = np.full((4, 6, 3), 10, np.uint8)
  b = np.full((4, 6, 3), 1.0, np.float32)
  small = np.zeros((2, 3, 3), np.uint8)
  grid = writers.image_grid([[a, b, a], [small]], pad=2)
  assert grid.shape == (2 * 4 + 3 * 2, 3 * 6 + 4 * 2, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[2:6, 2:8], a)
  np.testing.assert_array_equal(grid[2:6, 10:16], 255)  # b as uint8
  np.testing.assert_array_equal(grid[8:10, 2:5], 0)  # the smaller image, top-left of its cell
  assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()  # frame
  assert (grid[10:12, 2:8] == 255).all()  # rest of the small image's cell
  assert writers.image_grid([[a]], pad=0).shape == (4, 6, 3)


def test_mark_anchors_outlines_the_cell():
  rgb = np.full((32, 48, 3), 128, np.uint8)
  mask = np.zeros((2, 3), bool)
  mask[1, 2] = True  # cell rows 16..31, cols 32..47
  out = writers.mark_anchors(rgb, mask, stride=16)
  assert (rgb == 128).all()  # the input is left alone
  cell = out[16:32, 32:48]
  ring = np.ones((16, 16), bool)
  ring[1:-1, 1:-1] = False
  inner = np.zeros((16, 16), bool)
  inner[1:-1, 1:-1] = True
  inner[2:-2, 2:-2] = False
  assert (cell[ring] == 255).all()
  assert (cell[inner] == 0).all()
  assert (cell[2:-2, 2:-2] == 128).all()
  outside = np.ones((32, 48), bool)
  outside[16:32, 32:48] = False
  assert (out[outside] == 128).all()
  float_out = writers.mark_anchors(np.full((32, 48, 3), 0.5, np.float32), mask)
  assert float_out.dtype == np.uint8 and float_out[16, 40, 0] == 255
  with pytest.raises(ValueError, match='anchor grid'):
    writers.mark_anchors(rgb, np.zeros((3, 3), bool))


def test_param_overview_lists_modules_and_total():
  params = {'repnet': {'dense': {'kernel': jnp.zeros((1000, 32)), 'bias': jnp.zeros(32)}},
            'head': {'kernel': jax.ShapeDtypeStruct((32, 313), jnp.float32)}}
  table = writers.param_overview(params)
  lines = table.splitlines()
  assert lines[0].split() == ['module', 'parameters', 'share']
  assert lines[1].split() == ['repnet', '32,032', '76.2%']
  assert lines[2].split() == ['head', '10,016', '23.8%']
  assert lines[3].split() == ['total', '42,048', '100.0%']
  assert len({len(line) for line in lines}) == 1  # aligned columns


def test_compiled_stats_count_a_matmul():
  from disco_jax.training import compiled_stats  # pylint: disable=g-import-not-at-top
  n = 64
  a = jnp.ones((n, n), jnp.float32)
  compiled = jax.jit(lambda a, b: a @ b).lower(a, a).compile()
  stats = compiled_stats.compiled_stats(compiled)
  assert stats['flops'] == 2 * n ** 3
  assert stats['argument_bytes'] == 2 * n * n * 4 and stats['output_bytes'] == n * n * 4
  assert stats['peak_bytes'] >= stats['argument_bytes'] + stats['output_bytes']
  assert 'GFLOP' in compiled_stats.describe(stats)


def test_schedule_for_memory_adds_its_flag_once_and_keeps_the_users(monkeypatch):
  from disco_jax.training import compiled_stats  # pylint: disable=g-import-not-at-top
  flag = '--xla_cpu_enable_concurrency_optimized_scheduler'
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  compiled_stats.schedule_for_memory()
  assert os.environ['XLA_FLAGS'] == f'{flag}=false'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  compiled_stats.schedule_for_memory()
  compiled_stats.schedule_for_memory()
  assert os.environ['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=4 {flag}=false'
  monkeypatch.setenv('XLA_FLAGS', f'{flag}=true')  # the user's choice wins
  compiled_stats.schedule_for_memory()
  assert os.environ['XLA_FLAGS'] == f'{flag}=true'
