"""What a user sees of a training run: scalars, pictures, a progress line and a parameter table.

  workdir/metrics.jsonl                  one JSON object per write: {"step", "time", **scalars}
  workdir/tensorboard/                   the same scalars and the pictures, for TensorBoard
  workdir/samples/{name}_{step:08d}.png  the pictures, for anyone without TensorBoard

Only process 0 writes (`MetricWriter(..., enabled=jax.process_index() == 0)`); the others get a
writer that does nothing, so the training loop needs no `if`.
"""
import io
import json
import math
import os
import time
from typing import Callable

import jax
import numpy as np
from PIL import Image


def _json_number(name, value):
  """A scalar as a JSON value: ints stay ints; NaN/inf become strings so each line stays JSON
  (the json module would write the bare tokens NaN/Infinity, which other readers reject)."""
  array = np.asarray(value)
  if array.ndim != 0 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise ValueError(f'metric {name!r} must be a number, got {value!r}; average arrays '
                     'to a scalar before writing them')
  if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
    return int(array)
  number = float(array)
  if math.isnan(number):
    return 'nan'
  if math.isinf(number):
    return 'inf' if number > 0 else '-inf'
  return number


def to_uint8(image, name='image'):
  """`(H, W, 3)` uint8 from uint8 or float in [0, 1] (clipped, rounded)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'{name} must be an (H, W, 3) RGB image, got shape {image.shape}')
  if image.dtype == np.uint8:
    return image
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f'{name} must be uint8 or float in [0, 1], got dtype {image.dtype}')
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _png_bytes(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def _file_name(name):
  # TensorBoard groups tags by '/'; in a file name it would mean a folder.
  return name.replace('/', '_')


class MetricWriter:
  """JSON lines + TensorBoard scalars, TensorBoard + PNG images. A no-op unless `enabled`."""

  def __init__(self, workdir, enabled: bool | None = None):
    """`enabled`: whether this process writes; default: only process 0."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    if not self.enabled:
      return
    self._workdir = workdir
    # Imported here: TensorFlow takes seconds to import and most users of this module (tests,
    # other processes) never write TensorBoard files.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
    try:
      # TF would otherwise grab GPU memory that JAX needs.
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:
      pass  # TF was already initialised (e.g. by the input pipeline, which hides GPUs too)
    self._tf = tf
    # Files go through tf.io.gfile, so that the workdir may be a gs:// bucket.
    tf.io.gfile.makedirs(workdir)
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
    # tf.summary.scalar/image live in the `tensorboard` package, which we do not require; they
    # are tf.summary.write with these plugin tags, which TensorFlow alone provides.
    plugin = lambda name, data_class: tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name=name),
        data_class=data_class)
    self._scalar_meta = plugin('scalars', summary_pb2.DATA_CLASS_SCALAR)
    self._image_meta = plugin('images', summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
    # Appended to, so a resumed run continues the same file (steps may then repeat).
    self._jsonl = tf.io.gfile.GFile(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write_scalars(self, step: int, scalars: dict):
    """One line `{"step": step, "time": unix seconds, **scalars}` and one TensorBoard point each."""
    if not self.enabled or not scalars:
      return
    values = {k: _json_number(k, v) for k, v in scalars.items()}
    # Flushed per call so that `tail -f metrics.jsonl` and a crash both see every line.
    self._jsonl.write(json.dumps({'step': int(step), 'time': round(time.time(), 3), **values})
                      + '\n')
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for name, value in scalars.items():
        self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32),
                               metadata=self._scalar_meta)
    self._tb.flush()

  def write_images(self, step: int, images: dict):
    """`images`: name -> `(H, W, 3)` uint8 or float in [0, 1]; to TensorBoard and PNG files."""
    if not self.enabled or not images:
      return
    images = {name: to_uint8(image, f'image {name!r}') for name, image in images.items()}
    samples = os.path.join(self._workdir, 'samples')
    self._tf.io.gfile.makedirs(samples)
    with self._tb.as_default(step=int(step)):
      for name, image in images.items():
        png = _png_bytes(image)
        with self._tf.io.gfile.GFile(
            os.path.join(samples, f'{_file_name(name)}_{int(step):08d}.png'), 'wb') as f:
          f.write(png)
        # The images plugin's format: [width, height, png, ...] as strings.
        height, width = image.shape[:2]
        self._tf.summary.write(name, self._tf.constant([str(width), str(height), png]),
                               metadata=self._image_meta)
    self._tb.flush()

  def close(self):
    if not self.enabled or self._jsonl is None:
      return
    self._jsonl.close()
    self._jsonl = None
    self._tb.close()


def format_duration(seconds: float) -> str:
  """`45s`, `6m29s`, `2h05m07s` (rounded to the second)."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{secs:02d}s'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


# Scalars the progress line shows in their own fields rather than with the losses.
_OWN_FIELDS = ('lr', 'images_per_s')


class Progress:
  """Step count, throughput and ETA for the log line, from a smoothed time per step.

  Each call with a new step takes the clock; the first interval (from construction, when the
  first steps compile) is left out, later ones enter an exponential moving average. Calls with
  an already seen step reuse the last numbers, so `throughput` and `line` may both be called
  for one step.
  """

  def __init__(self, total_steps: int, start_step: int = 0,
               clock: Callable[[], float] = time.monotonic, smoothing: float = 0.9):
    """`smoothing`: weight of the old average in the moving average of seconds per step."""
    self.total_steps = total_steps
    self._clock = clock
    self._smoothing = smoothing
    self._last = (start_step, clock())  # (step, time) of the last observation
    self._compiled = False  # whether the first (compile-heavy) interval is behind us
    self.seconds_per_step = None  # smoothed; None until two observations after compilation

  def _observe(self, step):
    last_step, last_time = self._last
    if step <= last_step:
      return
    now = self._clock()
    self._last = (step, now)
    if not self._compiled:
      self._compiled = True
      return
    per_step = (now - last_time) / (step - last_step)
    if self.seconds_per_step is None:
      self.seconds_per_step = per_step
    else:
      self.seconds_per_step = (self._smoothing * self.seconds_per_step
                               + (1.0 - self._smoothing) * per_step)

  def throughput(self, step: int, images_per_step: int) -> float:
    """Images per second (NaN until known)."""
    self._observe(step)
    if not self.seconds_per_step:
      return math.nan
    return images_per_step / self.seconds_per_step

  def eta_seconds(self, step: int) -> float:
    """Seconds until `total_steps` (NaN until known)."""
    self._observe(step)
    if self.seconds_per_step is None:
      return math.nan
    return max(0, self.total_steps - step) * self.seconds_per_step

  def line(self, step: int, scalars: dict, images_per_step: int) -> str:
    """`step 120/600 (20.0%) | loss 4.213 ce 2.1 | lr 2.0e-04 | 12.3 img/s | 0.81 s/step |
    ETA 6m29s`; loss first, then the other scalars in their order; `--` while unknown."""
    throughput = self.throughput(step, images_per_step)
    eta = self.eta_seconds(step)
    percent = 100.0 * step / self.total_steps if self.total_steps else 100.0
    fields = [f'step {step}/{self.total_steps} ({percent:.1f}%)']
    names = sorted((k for k in scalars if k not in _OWN_FIELDS), key=lambda k: k != 'loss')
    if names:
      fields.append(' '.join(f'{k} {float(scalars[k]):.4g}' for k in names))
    if 'lr' in scalars:
      fields.append(f'lr {float(scalars["lr"]):.1e}')
    if self.seconds_per_step is None:
      fields += ['-- img/s', '-- s/step', 'ETA --']
    else:
      fields += [f'{throughput:.1f} img/s', f'{self.seconds_per_step:.2f} s/step',
                 f'ETA {format_duration(eta)}']
    return ' | '.join(fields)


def image_grid(rows, pad: int = 2, background: int = 255) -> np.ndarray:
  """`rows` (lists of `(H, W, 3)` uint8 or float [0, 1] images) as one uint8 picture.

  Every cell is as big as the largest image (smaller ones sit top-left) and `pad` pixels of
  `background` separate cells and frame the grid: `(R*H + (R+1)*pad, C*W + (C+1)*pad, 3)` for R
  rows of at most C images. Typically one row per example: gray | prediction | ground truth.
  """
  rows = [[to_uint8(image, f'grid image ({r}, {c})') for c, image in enumerate(row)]
          for r, row in enumerate(rows)]
  images = [image for row in rows for image in row]
  if not images:
    raise ValueError('image_grid needs at least one image')
  cell_h = max(image.shape[0] for image in images)
  cell_w = max(image.shape[1] for image in images)
  cols = max(len(row) for row in rows)
  grid = np.full((len(rows) * (cell_h + pad) + pad, cols * (cell_w + pad) + pad, 3), background,
                 np.uint8)
  for r, row in enumerate(rows):
    for c, image in enumerate(row):
      top, left = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
      grid[top:top + image.shape[0], left:left + image.shape[1]] = image
  return grid


def mark_anchors(rgb, anchor_mask, stride: int = 16) -> np.ndarray:
  """Outline each anchor's `stride` x `stride` cell: a white 1-pixel border with a dark line just
  inside it, so it shows on light and dark colours alike.

  Args:
    rgb: `(H, W, 3)` uint8 or float in [0, 1], with H = h * stride and W = w * stride.
    anchor_mask: `(h, w)`, true at the tokens chosen as anchors.
  Returns:
    `(H, W, 3)` uint8, a marked copy.
  """
  rgb = to_uint8(rgb, 'mark_anchors rgb').copy()
  mask = np.asarray(anchor_mask, bool)
  h, w = mask.shape
  if rgb.shape[:2] != (h * stride, w * stride):
    raise ValueError(f'mark_anchors: image {rgb.shape[:2]} is not the anchor grid {(h, w)} times '
                     f'the stride {stride}; pass the image the anchors were chosen for')
  cell = np.repeat(np.repeat(mask, stride, 0), stride, 1)  # (H, W): inside an anchor cell
  y = np.arange(h * stride)[:, None] % stride  # (H, 1): row within the cell
  x = np.arange(w * stride)[None, :] % stride  # (1, W)
  outer = (y == 0) | (y == stride - 1) | (x == 0) | (x == stride - 1)  # (H, W)
  inside = (y >= 1) & (y <= stride - 2) & (x >= 1) & (x <= stride - 2)
  inner = inside & ((y == 1) | (y == stride - 2) | (x == 1) | (x == stride - 2))
  rgb[cell & outer] = 255
  rgb[cell & inner] = 0
  return rgb


def param_overview(params) -> str:
  """A table of top-level modules and their parameter counts, then the total.

  `params`: a nested dict of arrays (or `jax.ShapeDtypeStruct`s: only shapes are read).
  """
  counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(sub))
            for name, sub in params.items()}
  total = sum(counts.values())
  rows = [(name, f'{n:,}', f'{100.0 * n / total:.1f}%' if total else '-')
          for name, n in counts.items()]
  rows.append(('total', f'{total:,}', '100.0%' if total else '-'))
  name_w = max(len('module'), *(len(r[0]) for r in rows))
  count_w = max(len('parameters'), *(len(r[1]) for r in rows))
  share_w = max(len(r[2]) for r in rows)
  lines = [f'{"module":<{name_w}}  {"parameters":>{count_w}}  {"share":>{share_w}}']
  lines += [f'{name:<{name_w}}  {count:>{count_w}}  {share:>{share_w}}'
            for name, count, share in rows]
  return '\n'.join(lines)
