"""A folder of photos as a TFDS dataset (prepared once), and the demo photos as such a folder.

`folder_builder` turns a directory into a `DiscoImageFolder` dataset under the TFDS data dir; its
photos are read by `data.images` (unreadable files are skipped and named) and stored as their own
JPEG bytes or as lossless PNG, which `decode` reads back inside tf.data.
"""
import dataclasses
import hashlib
import os
import re

from absl import logging
import jax
from jax.experimental import multihost_utils
from PIL import Image
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds

from disco_jax.data import images

# TF only decodes and resizes on the host; left alone it would also grab GPU memory that JAX needs.
tf.config.set_visible_devices([], 'GPU')

# The real colour photos inside the scikit-image wheel that load without pooch (no download):
# checked for 0.26. skin and lily are also colour but fetched on demand, so they are left out.
_DEMO_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'retina',
                'immunohistochemistry')
_DEMO_DIR = 'disco_demo_photos'


def data_dir_path(data_dir):
  """The absolute TFDS data dir of `config.input.data_dir` ('' = TFDS' default)."""
  return os.path.abspath(os.path.expanduser(data_dir or tfds.core.constants.get_default_data_dir()))


def decode(encoded):
  """Encoded JPEG/PNG/... bytes -> `(h, w, 3)` float32 RGB in [0, 1] (greyscale becomes RGB)."""
  rgb = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  rgb.set_shape([None, None, 3])
  return tf.cast(rgb, tf.float32) / 255.0



@dataclasses.dataclass(frozen=True)
class FolderReport:
  """What `prepare_folder` made of a folder of photos."""
  folder: str  # absolute path of the photos
  data_dir: str  # TFDS data dir holding the prepared dataset (derived from path and content)
  num_images: int  # examples in its 'train' split
  skipped: tuple[tuple[str, str], ...]  # (path, reason) of every file that could not be read


def stored_image(path):
  """What the dataset stores for an image file: its own bytes or its `(H, W, 3)` uint8 pixels.

  A plain RGB JPEG is stored as its own bytes (no re-encoding loss), but only if TF's decoder,
  which reads it back inside tf.data, gives the same size: libjpeg recovers from some corrupt
  entropy data with a warning under PIL, while TF refuses the file and would stop training.
  Anything else is stored as its upright RGB pixels, which TFDS encodes losslessly as PNG.
  """
  pixels, plain_jpeg = images.read_photo(path)
  if plain_jpeg:
    with open(path, 'rb') as f:
      encoded = f.read()
    try:
      if decode(encoded).shape == pixels.shape:
        return encoded
    except tf.errors.OpError:
      pass  # stored as pixels below
  return pixels


class DiscoImageFolder(tfds.core.GeneratorBasedBuilder):
  """A directory of photos as a TFDS dataset with one 'train' split (see `prepare_folder`)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Photos of a folder, upright RGB, unreadable files skipped.',
                   # A folder prepared by 1.0.0 may hold JPEG bytes that stop tf.data: re-prepared.
                   '1.1.0': 'JPEGs that TF cannot decode stored as pixels; pipes skipped.'}

  def __init__(self, *, folder=None, paths=(), **kwargs):
    self._folder = folder
    self._paths = tuple(paths)
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'file_name': tfds.features.Text(),  # path relative to the folder
        }),
        # Saved with the dataset, so a later run still knows which files were skipped.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    readable, skipped = [], []
    for path in self._paths:
      try:
        stored_image(path)  # the very decoding that preparing the dataset does
        readable.append(path)
      except Exception as e:  # pylint: disable=broad-except  # any unreadable file is skipped
        skipped.append((path, str(e)))
    if not readable:
      raise ValueError(f'input.folder: none of the {len(skipped)} image files under '
                       f'{self._folder} could be read (first: {skipped[:3]}); put readable '
                       f'{"/".join(images.IMAGE_EXTENSIONS)} photos there')
    self.info.metadata['skipped'] = skipped
    return {'train': self._generate_examples(readable)}

  def _generate_examples(self, paths):
    for path in paths:
      yield path, {'image': stored_image(path), 'file_name': os.path.relpath(path, self._folder)}


def _folder_data_dir(folder, paths, data_dir):
  """The data dir of a folder's dataset: named by its path and content (names, sizes, mtimes).

  Two folders never share a dataset, and adding, removing or rewriting a photo prepares a new one.
  Sizes and modification times stand in for the bytes so that hashing stays cheap on big folders.
  """
  digest = hashlib.sha256(folder.encode())
  for path in paths:
    # lstat for a dangling symlink, which is listed (and skipped, named) but has no target.
    st = os.stat(path) if os.path.exists(path) else os.lstat(path)
    digest.update(f'\0{os.path.relpath(path, folder)}\0{st.st_size}\0{st.st_mtime_ns}'.encode())
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(folder).lower()).strip('_')[:40] or 'folder'
  return os.path.join(data_dir, 'disco_folders', f'{slug}_{digest.hexdigest()[:16]}')


def _prepare(builder):
  """Prepares `builder` once; in a multi-process run process 0 goes first (shared disks)."""
  if jax.process_count() > 1:
    if jax.process_index() == 0 and not builder.is_prepared():
      builder.download_and_prepare()
    multihost_utils.sync_global_devices('disco_input_prepare')
    if jax.process_index() != 0 and builder.is_prepared():
      # Made before process 0 prepared the dataset, this builder has no splits or metadata yet.
      builder.info.read_from_directory(builder.data_dir)
  if not builder.is_prepared():  # single process, or a process with its own local data_dir
    builder.download_and_prepare()


def folder_builder(folder, data_dir):
  """-> (prepared DiscoImageFolder builder, FolderReport) for a directory of photos."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'input.folder: {folder} is not a directory; set --config.input.folder '
                            'to a directory of JPEG/PNG photos')
  paths = images.list_images(folder)
  if not paths:
    raise ValueError(f'input.folder: no image files ({", ".join(images.IMAGE_EXTENSIONS)}) under '
                     f'{folder}; put photos there or point --config.input.folder elsewhere')
  builder = DiscoImageFolder(folder=folder, paths=paths,
                             data_dir=_folder_data_dir(folder, paths, data_dir),
                             file_format=tfds.core.FileFormat.TFRECORD)
  fresh = not builder.is_prepared()
  _prepare(builder)
  skipped = tuple((str(p), str(r)) for p, r in builder.info.metadata['skipped'])
  if skipped:
    # A warning when the files are first skipped; later runs reuse the dataset and only note it.
    (logging.warning if fresh else logging.info)(
        'skipped %d unreadable files: %s', len(skipped),
        '; '.join(f'{p} ({r})' for p, r in skipped))
  report = FolderReport(folder=folder, data_dir=os.fspath(builder.data_dir_root),
                        num_images=builder.info.splits['train'].num_examples, skipped=skipped)
  return builder, report


def prepare_folder(folder, data_dir=''):
  """Turns a directory of photos into a TFDS dataset (once) and reports what went in.

  Every .jpg/.jpeg/.png/.gif (and .bmp/.webp/.tif where PIL reads them) under `folder`,
  recursively and whatever the case of the extension, is opened with PIL, turned upright by its
  EXIF orientation and converted to RGB (greyscale, 16-bit, CMYK, RGBA and palette images
  included; an animated GIF gives its first frame). Files PIL cannot read (empty, truncated, not
  an image, over PIL's decompression-bomb limit, dangling links, pipes) are skipped, named in a
  warning and listed in the returned report. The dataset goes into a directory under `data_dir`
  ('' = TFDS' default) named by the folder's path and content.
  """
  return folder_builder(folder, data_dir_path(data_dir))[1]


def demo_folder(data_dir=''):
  """Writes the demo photos (scikit-image's colour photos) as PNGs once; returns their folder."""
  folder = os.path.join(data_dir_path(data_dir), _DEMO_DIR)
  os.makedirs(folder, exist_ok=True)
  photos = {name: getattr(skimage.data, name) for name in _DEMO_PHOTOS}
  photos.update(motorcycle_left=lambda: skimage.data.stereo_motorcycle()[0],
                motorcycle_right=lambda: skimage.data.stereo_motorcycle()[1])
  for name, load in photos.items():
    path = os.path.join(folder, f'{name}.png')
    if not os.path.exists(path):
      # Written under a temporary name, then renamed: an interrupted run leaves no half file
      # that would change the folder's content hash forever.
      tmp = f'{path}.tmp{os.getpid()}'
      Image.fromarray(load()).save(tmp, format='PNG')
      os.replace(tmp, path)
  return folder
