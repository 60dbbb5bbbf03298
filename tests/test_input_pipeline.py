"""Input pipeline: folder datasets, preprocessing, resumable order, eval padding, clear failures."""
import io
import os
import shutil
import socket
import time

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from disco_jax.data import folder as folder_lib
from disco_jax.data import pipeline
from disco_jax.ops import colour
from tests import lab_reference

NUM_GOOD = 8  # readable photos in the `photos` folder
SIZE = 32
_GREY16 = np.arange(96, dtype=np.uint16).reshape(8, 12) * 2  # 8-bit values of a 16-bit PNG


def _blocks(rng, h, w):
  """A photo stand-in: (h, w, 3) uint8 of random colour blocks (compresses like a photo)."""
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """A folder of 8 readable photos in many formats and modes, 2 corrupt files and a .txt."""
  root = tmp_path_factory.mktemp('photos')
  (root / 'sub' / 'deeper').mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(_blocks(rng, 48, 64)).save(root / 'a0.jpg')
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(_blocks(rng, 40, 60)).save(root / 'sub' / 'B1.JPEG', exif=exif.tobytes())
  Image.fromarray(_blocks(rng, 50, 36)).save(root / 'sub' / 'deeper' / 'c2.png')
  Image.fromarray(_blocks(rng, 33, 45)).convert('L').save(root / 'd3.png')
  Image.fromarray(_blocks(rng, 64, 40)).convert('RGBA').save(root / 'e4.png')
  Image.fromarray(_blocks(rng, 36, 36)).convert('P').save(root / 'f5.png')
  Image.fromarray(_blocks(rng, 44, 52)).convert('CMYK').save(root / 'g6.jpg')
  # 16-bit greyscale, and smaller than SIZE: upscaled by the resize.
  Image.fromarray(_GREY16 * 257).save(root / 'h7.png')
  jpeg = io.BytesIO()
  Image.fromarray(_blocks(rng, 64, 64)).save(jpeg, format='JPEG')
  (root / 'trunc.jpg').write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
  (root / 'notes.png').write_text('not an image')
  (root / 'readme.txt').write_text('not an image extension: ignored, not skipped')
  return root


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _config(photos, data_dir, seed=0, **input_fields):
  config = ml_collections.ConfigDict()
  config.seed = seed
  config.input = ml_collections.ConfigDict(dict(
      dataset='folder', data_dir=str(data_dir), folder=str(photos), train_split='train',
      eval_split='train', image_size=SIZE, resize='squash', crop_min_scale=0.5, random_flip=False,
      global_batch_size=4, shuffle_buffer=16, prefetch=2))
  config.input.update(input_fields)
  return config


def _sharding():
  return NamedSharding(Mesh(np.array(jax.devices()), ('data',)), P('data'))


def _take(iterator, n):
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def _fingerprints(batches):
  """Mean gray per example: tells the (squashed, unaugmented) photos apart.  # (N,)"""
  return np.concatenate([b['gray'].mean(axis=(1, 2, 3)) for b in batches]).round(5)


def _offline(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)


def test_folder_skips_counts_and_names_unreadable_files(photos, data_dir):
  report = folder_lib.prepare_folder(str(photos), str(data_dir))
  assert report.num_images == NUM_GOOD
  assert sorted(os.path.basename(p) for p, _ in report.skipped) == ['notes.png', 'trunc.jpg']
  assert all(reason for _, reason in report.skipped)
  assert report.folder == str(photos)


def test_folder_warns_once_and_reprepares_when_changed(photos, tmp_path, caplog):
  folder = tmp_path / 'few'
  folder.mkdir()
  for name in ('a0.jpg', 'd3.png', 'notes.png'):
    shutil.copy(photos / name, folder / name)
  with caplog.at_level('WARNING'):
    first = folder_lib.prepare_folder(str(folder), str(tmp_path / 'tfds'))
  assert 'skipped 1 unreadable files' in caplog.text and 'notes.png' in caplog.text
  caplog.clear()
  with caplog.at_level('WARNING'):
    again = folder_lib.prepare_folder(str(folder), str(tmp_path / 'tfds'))
  assert again == first and 'skipped' not in caplog.text  # reused, not prepared twice
  shutil.copy(photos / 'h7.png', folder / 'h7.png')
  changed = folder_lib.prepare_folder(str(folder), str(tmp_path / 'tfds'))
  assert changed.data_dir != first.data_dir and changed.num_images == first.num_images + 1


def test_stored_photos_are_upright_rgb(photos, data_dir):
  builder = pipeline.dataset_builder(_config(photos, data_dir))
  stored = {ex['file_name'].decode(): ex['image']
            for ex in tfds.as_numpy(builder.as_dataset(split='train'))}
  assert len(stored) == NUM_GOOD and all(img.shape[-1] == 3 for img in stored.values())
  assert stored[os.path.join('sub', 'B1.JPEG')].shape == (60, 40, 3)  # EXIF rotation applied
  for name in ('d3.png', 'h7.png'):
    grey = stored[name].astype(int)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
  np.testing.assert_array_equal(stored['h7.png'][..., 0], _GREY16)  # scaled to 8 bits, not clipped


def test_train_batches_are_global_arrays_in_range(photos, data_dir):
  sharding = _sharding()
  batches = pipeline.train_iterator(_config(photos, data_dir), sharding)
  for _ in range(2):  # one epoch: every photo, the 8x12 one upscaled
    batch = next(batches)
    assert set(batch) == {'gray', 'ab'}
    gray, ab = batch['gray'], batch['ab']
    assert isinstance(gray, jax.Array) and gray.sharding == sharding
    assert gray.shape == (4, SIZE, SIZE, 1) and ab.shape == (4, SIZE, SIZE, 2)
    assert gray.dtype == ab.dtype == np.float32
    assert [s.data.shape for s in gray.addressable_shards] == [(1, SIZE, SIZE, 1)] * 4
    assert -1.0 <= float(gray.min()) < float(gray.max()) <= 1.0
    assert 0.0 < float(np.abs(ab).max()) < 1.3


def test_tf_lab_gives_the_reference_values():
  gray, ab = pipeline.normalised_lab(lab_reference.RGB.astype(np.float32))
  lab = colour.denormalise_lab(gray.numpy(), ab.numpy())
  np.testing.assert_allclose(lab, lab_reference.LAB, atol=lab_reference.ATOL)


def test_lab_agrees_with_colour_module():
  rng = np.random.default_rng(1)
  rgb = np.concatenate([rng.random((500, 3)), [[0, 0, 0], [1, 1, 1], [0.01, 0.03, 0.04045]]])
  rgb = rgb.astype(np.float32)
  gray, ab = pipeline.normalised_lab(rgb)
  want_gray, want_ab = colour.normalise_lab(colour.rgb_to_lab(rgb))
  np.testing.assert_allclose(gray.numpy(), want_gray, atol=1e-4)
  np.testing.assert_allclose(ab.numpy(), want_ab, atol=1e-4)


def test_eval_batches_hold_the_lab_of_the_squashed_photos(photos, data_dir):
  config = _config(photos, data_dir, global_batch_size=NUM_GOOD)
  (batch,) = _take(pipeline.eval_batches(config, _sharding()), 1)
  builder = pipeline.dataset_builder(config)
  stored = [ex['image'] for ex in tfds.as_numpy(builder.as_dataset('train', shuffle_files=False))]
  resized = np.stack([pipeline.squash_resize(img / np.float32(255), SIZE).numpy() for img in stored])
  want_gray, want_ab = colour.normalise_lab(colour.rgb_to_lab(resized))
  np.testing.assert_allclose(batch['gray'], want_gray, atol=1e-4)
  np.testing.assert_allclose(batch['ab'], want_ab, atol=1e-4)


def test_resumed_iterator_matches_uninterrupted_one(photos, data_dir):
  config = _config(photos, data_dir, resize='random_crop', random_flip=True)
  assert pipeline.steps_per_epoch(config) == 2  # so steps 3..5 cross the epoch boundary at 4
  fresh = _take(pipeline.train_iterator(config, _sharding()), 6)
  resumed = _take(pipeline.train_iterator(config, _sharding(), start_step=3), 3)
  for want, got in zip(fresh[3:], resumed):
    np.testing.assert_array_equal(got['gray'], want['gray'])
    np.testing.assert_array_equal(got['ab'], want['ab'])
  assert not np.array_equal(fresh[3]['gray'], fresh[5]['gray'])
  squashed = _take(pipeline.train_iterator(_config(photos, data_dir), _sharding()), 1)
  assert not np.array_equal(fresh[0]['gray'], squashed[0]['gray'])  # crops and flips happen


def test_each_epoch_is_a_new_permutation_and_seeds_differ(photos, data_dir):
  epochs = _fingerprints(_take(pipeline.train_iterator(_config(photos, data_dir), _sharding()), 4))
  first, second = epochs[:NUM_GOOD], epochs[NUM_GOOD:]
  assert len(set(first)) == NUM_GOOD and sorted(first) == sorted(second)
  assert not np.array_equal(first, second)
  other = _fingerprints(_take(pipeline.train_iterator(_config(photos, data_dir, seed=1), _sharding()), 2))
  assert sorted(other) == sorted(first) and not np.array_equal(other, first)


def test_eval_pads_the_last_batch_and_masks_it(photos, data_dir):
  config = _config(photos, data_dir, eval_split='train[:5]')
  batches = _take(pipeline.eval_batches(config, _sharding()), 2)
  assert [b['mask'].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
  assert not np.any(batches[1]['gray'][1:]) and not np.any(batches[1]['ab'][1:])
  again = list(pipeline.eval_batches(config, _sharding()))
  assert len(again) == 2
  np.testing.assert_array_equal(np.asarray(again[1]['gray']), batches[1]['gray'])
  assert len(list(pipeline.eval_batches(config, _sharding(), max_batches=1))) == 1


def test_processes_read_disjoint_shares(photos, data_dir):
  config = _config(photos, data_dir)
  whole = _fingerprints(pipeline.local_eval_dataset(config).as_numpy_iterator())
  shares = [list(pipeline.local_eval_dataset(config, process_index=i, process_count=2)
                 .as_numpy_iterator()) for i in range(2)]
  assert [len(s) for s in shares] == [2, 2] and shares[0][0]['gray'].shape[0] == 2
  parts = [_fingerprints(s) for s in shares]
  assert not set(parts[0]) & set(parts[1])
  assert sorted(np.concatenate(parts)) == sorted(whole)
  train = pipeline.local_train_dataset(config, process_index=1, process_count=2)
  assert next(train.as_numpy_iterator())['ab'].shape == (2, SIZE, SIZE, 2)


def test_empty_or_missing_folder_fails_naming_it(photos, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match=str(empty)):
    pipeline.steps_per_epoch(_config(empty, tmp_path / 'tfds'))
  bad = tmp_path / 'bad'
  bad.mkdir()
  shutil.copy(photos / 'notes.png', bad / 'notes.png')
  with pytest.raises(ValueError, match=str(bad)):
    folder_lib.prepare_folder(str(bad), str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'absent')):
    folder_lib.prepare_folder(str(tmp_path / 'absent'), str(tmp_path / 'tfds'))


def test_unprepared_tfds_datasets_fail_fast_offline(tmp_path, monkeypatch):
  _offline(monkeypatch)
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as error:
    pipeline.steps_per_epoch(_config('', tmp_path, dataset='imagenet2012'))
  message = str(error.value)
  assert os.path.join(tmp_path, 'downloads', 'manual', 'ILSVRC2012_img_train.tar') in message
  assert 'ILSVRC2012_img_val.tar' in message and 'tfds build imagenet2012' in message
  with pytest.raises(FileNotFoundError, match='tfds build coco/2017'):
    pipeline.train_iterator(_config('', tmp_path, dataset='coco/2017'), _sharding())
  assert time.monotonic() - start < 5.0


def test_unknown_dataset_lists_the_valid_ones(tmp_path):
  with pytest.raises(ValueError, match='imagenet2012.*coco/2017.*folder.*demo'):
    pipeline.steps_per_epoch(_config('', tmp_path, dataset='cifar10'))


def test_demo_builds_offline_from_the_scikit_image_photos(tmp_path, monkeypatch):
  _offline(monkeypatch)
  config = _config('', tmp_path, dataset='demo', global_batch_size=4)
  builder = pipeline.dataset_builder(config)
  assert builder.info.splits['train'].num_examples >= 6
  assert pipeline.steps_per_epoch(config) == builder.info.splits['train'].num_examples // 4
  (batch,) = _take(pipeline.eval_batches(config, _sharding(), max_batches=1), 1)
  assert batch['mask'].all() and np.abs(batch['ab']).max() > 0.1  # real colour photos


def test_prefetch_runs_ahead_and_hands_errors_over():
  made = []

  def items():
    for i in range(5):
      made.append(i)
      yield i
    raise OSError('record 5 unreadable')

  consumer = pipeline.prefetch(items(), depth=2)  # pylint: disable=protected-access
  deadline = time.monotonic() + 5
  while len(made) < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.2)
  # Made ahead before anything was asked for: `depth` queued plus one waiting for a free slot.
  assert made == [0, 1, 2]
  assert [next(consumer) for _ in range(5)] == [0, 1, 2, 3, 4]
  with pytest.raises(OSError, match='record 5 unreadable'):
    next(consumer)
