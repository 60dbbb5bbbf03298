"""Training and evaluation input for DISCO: TFDS records -> tf.data -> global jax.Arrays.

Every batch is a dict `{'gray': (B, H, W, 1) float32 = (L - 50) / 50, 'ab': (B, H, W, 2) float32 =
ab / 110}` (eval batches add `'mask': (B,) bool`). Each value is a global `jax.Array` made with
`jax.make_array_from_process_local_data`: every process reads its own share of the records
(`tfds.split_for_jax_process`) and contributes `global_batch_size // process_count` rows.

Preprocessing follows the official recipe: decode to RGB uint8, divide by 255, resize
the whole image to `image_size`^2 with bicubic interpolation (aspect ratio not kept: 'squash'), then
OpenCV's float RGB->Lab (`colour.rgb_to_lab`, written here in TF ops) and normalise. 'random_crop'
and 'random_flip' are augmentations for the tiny demo set; the official recipe has none. Images
smaller than `image_size` are upscaled by the same resize.

Datasets: 'imagenet2012' (manual download, see `_tfds_problem`), 'coco/2017' (TFDS downloads it
once with `tfds build`), 'folder' (a directory of the user's photos, turned into a TFDS dataset by
`folder.prepare_folder`) and 'demo' (the colour photos shipped inside scikit-image, going through
the same folder builder). `check_dataset` only looks; `dataset_builder` prepares what is missing.

Why tf.data and not grain/ArrayRecord: TFDS' imagenet2012 and coco are prepared as TFRecord files and
read natively by tf.data; grain would need every dataset converted to ArrayRecord first. The one
thing grain gives (a checkpointable iterator position) we get without iterator state, below.

Resume contract: the training batch sequence is a pure function of (`config.input`, `config.seed`,
process index, process count). `train_iterator(config, sharding, start_step=n)` yields exactly the
batches an uninterrupted iterator yields from step n on, so a resumed run only needs its step:
  * epoch e reads the shards in an order drawn from (seed, e), interleaves them and shuffles with a
    buffer seeded by (seed, e); the first `steps_per_epoch * local_batch` records form the epoch
    (the last partial batch is dropped) and the epochs repeat forever;
  * random crops and flips use stateless ops keyed by (seed, process, epoch, index in the epoch),
    so they do not depend on where the run started;
  * resuming at step n skips whole epochs arithmetically and, inside epoch n // steps_per_epoch,
    skips the earlier records before they are decoded (they are read, never decoded or resized).
Changing the dataset's files, the batch size, the process count or the TF version gives a different
(equally valid) sequence.
"""
import atexit
import glob
import math
import os
import queue
import threading
import weakref

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from disco_jax.data import folder, images
from disco_jax.ops import colour

DATASETS = ('imagenet2012', 'coco/2017', 'folder', 'demo')
RESIZES = ('squash', 'random_crop')
# TFDS datasets prepared by TFDS' own builders (the other two go through `folder`).
_TFDS_DATASETS = ('imagenet2012', 'coco/2017')
_IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')

# Streams of the stateless randomness: folded into the seed so that shuffling and augmentation
# never share random numbers.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
_MAX_INTERLEAVE = 16  # shards read at once in training: mixes records across files


# ----------------------------------------------------------------------------------------------
# TFDS datasets


def _tfds_problem(name, data_dir):
  """Why the TFDS dataset `name` cannot be used from `data_dir`, or None; reads files only.

  An imagenet2012 whose two tars are in place counts as usable: the training start prepares it.
  """
  if glob.glob(os.path.join(data_dir, *name.split('/'), '*', 'dataset_info.json')):
    if tfds.builder(name, data_dir=data_dir).is_prepared():
      return None
  if name != 'imagenet2012':
    return (f'input.dataset={name} is not prepared in input.data_dir={data_dir}; prepare it once '
            f'on a machine with network access: `tfds build {name} --data_dir={data_dir}` (TFDS '
            'downloads it), or point --config.input.data_dir at a directory where it is prepared')
  manual = os.path.join(data_dir, 'downloads', 'manual')
  missing = [os.path.join(manual, t) for t in _IMAGENET_TARS
             if not os.path.isfile(os.path.join(manual, t))]
  if missing:
    return (f'input.dataset=imagenet2012 is not prepared in input.data_dir={data_dir} and needs a '
            f'manual download: register at https://image-net.org/download-images, put '
            f'{" and ".join(os.path.join(manual, t) for t in _IMAGENET_TARS)} there (missing: '
            f'{", ".join(missing)}), then run `tfds build imagenet2012 --data_dir={data_dir}` once '
            '(or start a single-process training, which prepares it on first use; hours)')
  if jax.process_count() > 1:
    return (f'imagenet2012 is not prepared in {data_dir}: run `tfds build imagenet2012 '
            f'--data_dir={data_dir}` once before a multi-process run')
  return None


def check_dataset(config):
  """Why `config.input` names no usable dataset, or None. Pure: nothing is prepared or written,
  and nothing touches the network (a missing dataset never reaches TFDS' download code)."""
  inp = config.input
  if inp.dataset not in DATASETS:
    return f'input.dataset={inp.dataset!r} is unknown; choose one of {DATASETS}'
  if inp.dataset == 'folder':
    if not os.path.isdir(inp.folder):
      return (f'input.folder={inp.folder!r}: dataset "folder" needs an existing directory of '
              'photos')
    if not images.list_images(inp.folder):
      return (f'input.folder: no image files ({", ".join(images.IMAGE_EXTENSIONS)}) under '
              f'{inp.folder}; put photos there or point --config.input.folder elsewhere')
  if inp.dataset in _TFDS_DATASETS:
    return _tfds_problem(inp.dataset, folder.data_dir_path(inp.data_dir))
  return None


def dataset_builder(config):
  """The prepared TFDS builder of `config.input.dataset`, preparing it first where needed (folders
  and the demo photos once, imagenet2012 from its manual download): the one place that does."""
  inp = config.input
  data_dir = folder.data_dir_path(inp.data_dir)
  if inp.dataset == 'folder':
    return folder.folder_builder(inp.folder, data_dir)[0]
  if inp.dataset == 'demo':
    return folder.folder_builder(folder.demo_folder(data_dir), data_dir)[0]
  if inp.dataset not in _TFDS_DATASETS:
    raise ValueError(f'input.dataset={inp.dataset!r} is unknown; choose one of {DATASETS}')
  problem = _tfds_problem(inp.dataset, data_dir)
  if problem:
    raise FileNotFoundError(problem)
  builder = tfds.builder(inp.dataset, data_dir=data_dir)
  if not builder.is_prepared():  # imagenet2012 with its tars in place
    logging.info('preparing %s from %s into %s (takes hours, done once)', inp.dataset,
                 os.path.join(data_dir, 'downloads', 'manual'), data_dir)
    builder.download_and_prepare()
  if builder.info.file_format not in (None, tfds.core.FileFormat.TFRECORD):
    raise ValueError(f'{inp.dataset} in {data_dir} is stored as {builder.info.file_format}; '
                     'this pipeline reads TFRecord: rebuild it with `tfds build '
                     f'{inp.dataset} --file_format=tfrecord`')
  return builder


def _check_input(inp, process_count):
  if inp.dataset not in DATASETS:
    raise ValueError(f'input.dataset={inp.dataset!r} is unknown; choose one of {DATASETS}')
  if inp.image_size <= 0 or inp.image_size % 16:
    raise ValueError(f'input.image_size={inp.image_size} must be a positive multiple of 16')
  if inp.resize not in RESIZES:
    raise ValueError(f'input.resize={inp.resize!r} is unknown; choose one of {RESIZES}')
  if inp.resize == 'random_crop' and not 0.0 < inp.crop_min_scale <= 1.0:
    raise ValueError(f'input.crop_min_scale={inp.crop_min_scale} must lie in (0, 1]')
  if inp.global_batch_size <= 0 or inp.global_batch_size % process_count:
    raise ValueError(f'input.global_batch_size={inp.global_batch_size} must be a positive '
                     f'multiple of the process count {process_count}')


def _train_steps_per_epoch(builder, inp):
  n = builder.info.splits[inp.train_split].num_examples
  if n < inp.global_batch_size:
    raise ValueError(f'input.train_split={inp.train_split!r} of {inp.dataset} has {n} examples, '
                     f'fewer than one batch (input.global_batch_size={inp.global_batch_size}); '
                     'add images or lower the batch size')
  return n // inp.global_batch_size


def steps_per_epoch(config):
  """Training steps per epoch: examples of `input.train_split` // `input.global_batch_size`."""
  _check_input(config.input, jax.process_count())
  return _train_steps_per_epoch(dataset_builder(config), config.input)


# ----------------------------------------------------------------------------------------------
# Per-image preprocessing (TF ops, runs inside tf.data)


def squash_resize(rgb, size):
  """RGB `(h, w, 3)` float32 in [0, 1] -> `(size, size, 3)`: bicubic, aspect ratio not kept.

  Clipped to [0, 1] because bicubic overshoots at edges; the official code resizes uint8 images,
  where OpenCV saturates the same way, and Lab is only defined for in-gamut RGB.
  """
  resized = tf.image.resize(rgb, (size, size), method='bicubic')
  return tf.clip_by_value(resized, 0.0, 1.0)


def normalised_lab(rgb):
  """RGB `(..., 3)` float32 in [0, 1] -> (gray `(..., 1)`, ab_n `(..., 2)`).

  `colour.normalise_lab(colour.rgb_to_lab(rgb))` in TF ops with the same constants, so that it
  runs in tf.data's threads rather than under the GIL.
  """
  rgb = tf.convert_to_tensor(rgb, tf.float32)
  lin = tf.where(rgb <= 0.04045, rgb / 12.92, ((tf.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4)
  # colour.py holds the one definition of OpenCV's Lab constants.
  rgb2xyz = tf.constant(colour.RGB2XYZ.T, tf.float32)
  xyz = tf.tensordot(lin, rgb2xyz, axes=1) / tf.constant(colour.WHITE_D65, tf.float32)
  eps, kappa = colour.LAB_EPS, colour.LAB_KAPPA
  f = tf.where(xyz > eps, tf.maximum(xyz, eps) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
  y = xyz[..., 1:2]
  lum = tf.where(y > eps, 116.0 * f[..., 1:2] - 16.0, kappa * y)
  ab = tf.concat([500.0 * (f[..., 0:1] - f[..., 1:2]), 200.0 * (f[..., 1:2] - f[..., 2:3])], -1)
  return (lum - colour.L_CENTRE) / colour.L_SCALE, ab / colour.AB_SCALE


def _random_square_crop(rgb, min_scale, seed):
  """A square crop of side U[min_scale, 1] x the shorter side, at a random place; `(s, s, 3)`."""
  scale_seed, place_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  short = tf.minimum(tf.shape(rgb)[0], tf.shape(rgb)[1])
  scale = tf.random.stateless_uniform([], scale_seed, minval=min_scale, maxval=1.0)
  side = tf.cast(tf.round(scale * tf.cast(short, tf.float32)), tf.int32)
  side = tf.clip_by_value(side, 1, short)
  return tf.image.stateless_random_crop(rgb, tf.stack([side, side, 3]), seed=place_seed)


def _fold(seed, *data):
  """Stateless seed `(2,)` with each of `data` folded in (a counter-based key, like jax's)."""
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return seed


# ----------------------------------------------------------------------------------------------
# Host-local tf.data pipelines


def _image_parser(builder):
  """Serialised record -> encoded image bytes, parsing only the image (coco's boxes are skipped)."""
  spec = {'image': builder.info.features.tf_example_spec['image']}
  return lambda record: tf.io.parse_single_example(record, spec)['image']


def _shards(builder, split):
  """(filenames, skips, takes) of the TFRecord shards of `split`: three `(n,)` tensors."""
  instructions = builder.info.splits[split].file_instructions
  return (tf.constant([i.filename for i in instructions]),
          tf.constant([i.skip for i in instructions], tf.int64),
          tf.constant([i.take for i in instructions], tf.int64))


def _read_shard(filename, skip, take):
  return tf.data.TFRecordDataset(filename).skip(skip).take(take)


def _deterministic(ds):
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def local_train_dataset(config, start_step=0, process_index=0, process_count=1):
  """This process's training batches from step `start_step` on, as a host tf.data.Dataset.

  Yields dicts of numpy-convertible `gray (b, S, S, 1)`, `ab (b, S, S, 2)` with
  b = global_batch_size // process_count; see the module docstring for the resume contract.
  """
  inp = config.input
  _check_input(inp, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  builder = dataset_builder(config)
  spe = _train_steps_per_epoch(builder, inp)
  local_batch = inp.global_batch_size // process_count
  split = tfds.split_for_jax_process(inp.train_split, process_index=process_index,
                                     process_count=process_count, drop_remainder=True)
  filenames, skips, takes = _shards(builder, split)
  num_shards = int(filenames.shape[0])
  first_epoch, step_in_epoch = divmod(start_step, spe)
  records_per_epoch = spe * local_batch  # floor(floor(N / P) / b) == floor(N / G): same on all
  root = tf.constant([config.seed, process_index], tf.int64)
  parse = _image_parser(builder)
  size = inp.image_size
  random_crop = inp.resize == 'random_crop'
  min_scale = inp.crop_min_scale if random_crop else 1.0

  def epoch_records(epoch):  # -> (epoch, index in epoch, serialised record)
    # Seeded by (seed, epoch) only, not the process: each process orders its own disjoint shard.
    key = _fold(tf.constant([config.seed, 0], tf.int64), _SHUFFLE_STREAM, epoch)
    order_seed, buffer_seed = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    order = tf.argsort(tf.random.stateless_uniform([num_shards], order_seed))
    shards = tf.data.Dataset.from_tensor_slices(
        (tf.gather(filenames, order), tf.gather(skips, order), tf.gather(takes, order)))
    records = shards.interleave(_read_shard, cycle_length=min(num_shards, _MAX_INTERLEAVE),
                                block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
    shuffle_seed = tf.random.stateless_uniform([], buffer_seed, minval=None, maxval=None,
                                               dtype=tf.int64)
    records = records.shuffle(inp.shuffle_buffer, seed=shuffle_seed,
                              reshuffle_each_iteration=False)
    records = records.take(records_per_epoch).enumerate()
    # The resumed epoch skips the records of its earlier steps here, before any decoding.
    resumed = tf.where(epoch == first_epoch, tf.constant(step_in_epoch * local_batch, tf.int64),
                       tf.constant(0, tf.int64))
    return records.skip(resumed).map(lambda index, record: (epoch, index, record))

  def example(epoch, index, record):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
        _fold(root, _AUGMENT_STREAM, epoch, index), 2))
    rgb = folder.decode(parse(record))  # (h, w, 3)
    if random_crop:
      rgb = _random_square_crop(rgb, min_scale, crop_seed)
    rgb = squash_resize(rgb, size)  # (S, S, 3)
    if inp.random_flip:
      rgb = tf.image.stateless_random_flip_left_right(rgb, flip_seed)
    gray, ab = normalised_lab(rgb)
    return {'gray': gray, 'ab': ab}

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _deterministic(ds)


def local_eval_dataset(config, max_batches=None, process_index=0, process_count=1):
  """This process's share of one pass over `input.eval_split`, in a fixed order, squashed.

  Yields dicts `gray (b, S, S, 1)`, `ab (b, S, S, 2)`, `mask (b,)`. Every process yields the same
  number of batches (their shares differ by at most one example): the last batch is padded with
  zero images whose mask is False, so no example is dropped.
  """
  inp = config.input
  _check_input(inp, process_count)
  builder = dataset_builder(config)
  local_batch = inp.global_batch_size // process_count
  total = builder.info.splits[inp.eval_split].num_examples
  num_batches = math.ceil(math.ceil(total / process_count) / local_batch)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  split = tfds.split_for_jax_process(inp.eval_split, process_index=process_index,
                                     process_count=process_count)
  parse = _image_parser(builder)
  size = inp.image_size

  def example(record):
    gray, ab = normalised_lab(squash_resize(folder.decode(parse(record)), size))
    return {'gray': gray, 'ab': ab, 'mask': tf.constant(True)}

  padding = {'gray': tf.zeros([size, size, 1]), 'ab': tf.zeros([size, size, 2]),
             'mask': tf.constant(False)}
  ds = tf.data.Dataset.from_tensor_slices(_shards(builder, split)).flat_map(_read_shard)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(num_batches * local_batch).batch(local_batch).prefetch(tf.data.AUTOTUNE)
  return _deterministic(ds)


# ----------------------------------------------------------------------------------------------
# Global device batches


def _check_sharding(sharding, global_batch):
  try:
    sharding.shard_shape((global_batch,))
  except ValueError as e:
    raise ValueError(f'input.global_batch_size={global_batch} does not split over the batch '
                     f'sharding {sharding}: make it a multiple of the number of devices the '
                     'batch is sharded over') from e


_RUNNING = {}  # thread -> stop event, for every prefetch thread still alive


@atexit.register
def _stop_prefetch_threads():
  """Stops and joins the prefetch threads before the interpreter kills daemon threads.

  A daemon thread killed inside a TF call aborts the whole process at exit ("terminate called
  after throwing an instance of ''"), even after a clean run. A thread finishes its current batch
  and then sees the stop, so the join is short.
  """
  for stop in list(_RUNNING.values()):
    stop.set()
  for thread in list(_RUNNING):
    thread.join(timeout=60)


def prefetch(items, depth):
  """Runs the iterator `items` in a background thread, up to `depth` items ahead of the consumer.

  The thread starts now, so the first batches are being made while the model compiles. An error
  in the thread is raised in the consumer's thread; closing or dropping the returned generator
  stops the thread (daemon, so a forgotten iterator never keeps the process alive).
  """
  slots = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(kind, value):  # False once the consumer has gone away
    while not stop.is_set():
      try:
        slots.put((kind, value), timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def fill():
    try:
      for item in items:
        if not put('item', item):
          return
      put('end', None)
    except Exception as e:  # pylint: disable=broad-except  # handed over and re-raised below
      put('error', e)
    finally:
      _RUNNING.pop(threading.current_thread(), None)

  thread = threading.Thread(target=fill, name='disco-input-prefetch', daemon=True)
  _RUNNING[thread] = stop
  thread.start()

  def consume():
    try:
      while True:
        kind, value = slots.get()
        if kind == 'end':
          return
        if kind == 'error':
          raise value
        yield value
    finally:
      stop.set()

  consumer = consume()
  # A generator that was never started runs no `finally` when collected: stop the thread then too.
  weakref.finalize(consumer, stop.set)
  return consumer


def _global_batches(ds, sharding):
  for local in ds.as_numpy_iterator():
    yield {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def train_iterator(config, sharding, start_step=0):
  """Endless global training batches from step `start_step` on (see the resume contract above).

  `sharding`: a `jax.sharding.NamedSharding` of the batch's leading axis. Yields
  `{'gray': (B, S, S, 1), 'ab': (B, S, S, 2)}` float32 global jax.Arrays, B = global_batch_size,
  made `config.input.prefetch` batches ahead in a background thread.
  """
  _check_sharding(sharding, config.input.global_batch_size)
  ds = local_train_dataset(config, start_step, jax.process_index(), jax.process_count())
  return prefetch(_global_batches(ds, sharding), config.input.prefetch)


def eval_batches(config, sharding, max_batches=None):
  """One deterministic pass over `input.eval_split`: `{'gray', 'ab', 'mask': (B,) bool}` batches.

  No augmentation (squash resize). The last batch is padded to the full batch size; `mask` marks
  the real examples. `max_batches` stops early (None: the whole split).
  """
  _check_sharding(sharding, config.input.global_batch_size)
  ds = local_eval_dataset(config, max_batches, jax.process_index(), jax.process_count())
  return prefetch(_global_batches(ds, sharding), config.input.prefetch)
