"""imagenet2012 and coco/2017 read as real TFDS records through data.pipeline.

`tfds.testing.mock_data` cannot serve here: it replaces `as_dataset` with generated examples and
writes no files, while the pipeline reads the TFRecord shards named by
`builder.info.splits[split].file_instructions`. So each dataset is prepared for real, by TFDS' own
builder (`tfds.builder(name)`: its features, its example writer, its shard naming and its
dataset_info.json), from tiny source files in the formats the builders read:
  * imagenet2012: the two manual-download tars (a tar of per-synset tars of JPEGs, a tar of
    ILSVRC2012_val_*.JPEG) in data_dir/downloads/manual, prepared by `pipeline.dataset_builder`
    at the first use, as a training start does;
  * coco/2017: TFDS would download zips of images and annotation JSON; the download manager's
    `download_and_extract` is replaced by a function returning folders laid out as those zips
    extract (train2017/, annotations/instances_train2017.json, ...), the way TFDS' own builder
    tests feed dummy data, and then `download_and_prepare` runs as `tfds build coco/2017` would.
Network access fails the test. The records are then read, decoded, squashed and converted by
`local_train_dataset` / `local_eval_dataset`, and compared with the Lab of the source JPEGs.
"""
import io
import json
import socket
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from disco_jax.data import pipeline
from disco_jax.ops import colour

SIZE = 32
BATCH = 4  # global batch; two processes read 2 each


def _jpeg(seed):
  """A small JPEG of colour blocks, each of its own (non-square) size."""
  rng = np.random.default_rng(seed)
  h, w = 24 + 8 * (seed % 5), 40 + 4 * (seed % 7)
  small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(small).resize((w, h), Image.NEAREST).save(buf, 'JPEG', quality=95)
  return buf.getvalue()


def _squashed_lab(jpeg):
  """What the pipeline must make of a JPEG: (gray (S, S, 1), ab (S, S, 2)) by numpy Lab."""
  rgb = tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(np.float32) / 255.0
  return colour.normalise_lab(colour.rgb_to_lab(pipeline.squash_resize(rgb, SIZE).numpy()))


def _fingerprint(gray):
  return round(float(np.mean(gray)), 4)


def _tar(entries):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w') as tar:
    for name, data in entries:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _config(dataset, data_dir):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.input = ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=str(data_dir), folder='', train_split='train',
      eval_split='validation', image_size=SIZE, resize='squash', crop_min_scale=1.0,
      random_flip=False, global_batch_size=BATCH, shuffle_buffer=16, prefetch=2))
  return config


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
  """(config, train JPEGs, validation JPEGs): 8 training images of two synsets, 5 validation."""
  data_dir = tmp_path_factory.mktemp('tfds_imagenet')
  manual = data_dir / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  train = {f'{syn}_{900 + i}.JPEG': _jpeg(10 * k + i)
           for k, syn in enumerate(('n01440764', 'n01443537')) for i in range(4)}
  per_synset = [(f'{syn}.tar', _tar([(n, d) for n, d in train.items() if n.startswith(syn)]))
                for syn in ('n01440764', 'n01443537')]
  (manual / 'ILSVRC2012_img_train.tar').write_bytes(_tar(per_synset))
  val = {f'ILSVRC2012_val_{i:08d}.JPEG': _jpeg(100 + i) for i in range(1, 6)}
  (manual / 'ILSVRC2012_img_val.tar').write_bytes(_tar(val.items()))
  return _config('imagenet2012', data_dir), train, val


def _coco_split(root, split, images, annotated):
  """Folders as coco's image and annotation zips extract: (images dir, annotations dir)."""
  image_dir, ann_dir = root / f'{split}_images', root / f'{split}_annotations'
  (image_dir / split).mkdir(parents=True)
  (ann_dir / 'annotations').mkdir(parents=True)
  entries = []
  for i, (name, data) in enumerate(sorted(images.items())):
    (image_dir / split / name).write_bytes(data)
    h, w = tf.io.decode_jpeg(data).shape[:2]
    entries.append(dict(id=i + 1, file_name=name, height=h, width=w))
  # The builder's label feature has COCO's 80 classes, and takes their names from the file.
  categories = [dict(id=c, name=f'class{c}', supercategory='thing') for c in range(1, 81)]
  content = dict(categories=categories, images=entries)
  if annotated:
    content['annotations'] = [dict(id=10 + e['id'], image_id=e['id'], bbox=[1, 2, 10, 8],
                                   category_id=1, area=80.0, iscrowd=0) for e in entries]
  prefix = 'instances' if annotated else 'image_info'
  (ann_dir / 'annotations' / f'{prefix}_{split}.json').write_text(json.dumps(content))
  return image_dir, ann_dir


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
  """(config, train JPEGs, validation JPEGs) of a coco/2017 prepared by its TFDS builder."""
  root = tmp_path_factory.mktemp('coco_sources')
  data_dir = tmp_path_factory.mktemp('tfds_coco')
  train = {f'{i:012d}.jpg': _jpeg(200 + i) for i in range(1, 7)}
  val = {f'{i:012d}.jpg': _jpeg(300 + i) for i in range(1, 6)}
  paths = {}
  for split, key, images, annotated in (('train2017', 'train', train, True),
                                         ('val2017', 'validation', val, True),
                                         ('test2017', 'test', {'000000000001.jpg': _jpeg(400)},
                                          False)):
    paths[f'{key}_images'], paths[f'{key}_annotations'] = _coco_split(root, split, images,
                                                                      annotated)
  config = _config('coco/2017', data_dir)
  assert 'not prepared' in pipeline.check_dataset(config)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                  lambda self, urls: {k: paths[k] for k in urls})
    tfds.builder('coco/2017', data_dir=str(data_dir)).download_and_prepare()  # `tfds build`
  return config, train, val


@pytest.mark.parametrize('dataset', ['imagenet', 'coco'])
def test_validation_records_are_decoded_squashed_lab_and_padded(dataset, request):
  config, _, val = request.getfixturevalue(dataset)
  assert pipeline.check_dataset(config) is None  # imagenet: its tars are in place
  batches = list(pipeline.local_eval_dataset(config).as_numpy_iterator())  # imagenet: prepares
  builder = pipeline.dataset_builder(config)
  assert builder.info.splits['validation'].num_examples == len(val) == 5
  assert type(builder).__module__.startswith('tensorflow_datasets.')  # TFDS' own builder
  assert [b['mask'].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
  assert not np.any(batches[1]['gray'][1:]) and not np.any(batches[1]['ab'][1:])
  want = {_fingerprint(g): (g, a) for g, a in map(_squashed_lab, val.values())}
  assert len(want) == len(val)
  gray = np.concatenate([b['gray'] for b in batches])[:5]  # (5, S, S, 1)
  ab = np.concatenate([b['ab'] for b in batches])[:5]  # (5, S, S, 2)
  assert sorted(map(_fingerprint, gray)) == sorted(want)
  for g, a in zip(gray, ab):
    want_gray, want_ab = want[_fingerprint(g)]
    # TF-ops Lab against numpy Lab of the same decoded, squashed pixels: float32 noise (as in
    # test_input_pipeline's agreement test).
    np.testing.assert_allclose(g, want_gray, atol=1e-4)
    np.testing.assert_allclose(a, want_ab, atol=1e-4)


@pytest.mark.parametrize('dataset', ['imagenet', 'coco'])
def test_two_processes_read_disjoint_shares_of_the_records(dataset, request):
  config, train, val = request.getfixturevalue(dataset)
  steps = pipeline.steps_per_epoch(config)
  assert steps == len(train) // BATCH
  train_want = sorted(_fingerprint(_squashed_lab(j)[0]) for j in train.values())
  shares = []
  for index in range(2):
    it = pipeline.local_train_dataset(config, process_index=index,
                                      process_count=2).as_numpy_iterator()
    epoch = [next(it) for _ in range(steps)]  # one epoch: BATCH // 2 records a step
    assert epoch[0]['gray'].shape == (BATCH // 2, SIZE, SIZE, 1)
    shares.append([_fingerprint(g) for b in epoch for g in b['gray']])
  assert not set(shares[0]) & set(shares[1])
  assert set(shares[0]) | set(shares[1]) <= set(train_want)
  assert len(set(shares[0]) | set(shares[1])) == steps * BATCH
  evals = [[_fingerprint(g) for b in pipeline.local_eval_dataset(
      config, process_index=i, process_count=2).as_numpy_iterator()
            for g, m in zip(b['gray'], b['mask']) if m] for i in range(2)]
  assert sorted(evals[0] + evals[1]) == sorted(_fingerprint(_squashed_lab(j)[0])
                                               for j in val.values())
  assert not set(evals[0]) & set(evals[1]) and [len(e) for e in evals] == [3, 2]
