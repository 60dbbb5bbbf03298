"""Hostile and odd image files, and a campaign feeding them through disco-jax's two photo readers.

  python tools/hostile_corpus.py /tmp/hostile                         # writes the base corpus
  python tools/hostile_corpus.py /tmp/hostile --count 500 --campaign  # 500 files, both readers

`write_corpus(directory, count)` writes the corpus and returns `[(path, 'ok' | 'bad')]`;
`_base_cases` is the table of what each base file is and what must happen to it: 'ok' files (odd but
readable: CMYK, 16-bit, palette, 1x1, 20000x10, EXIF-rotated, ...) must be kept by the image-folder
dataset and colorized at their displayed size and lightness; 'bad' files (empty, truncated, not an
image, a decompression bomb, a dangling symlink, a pipe, ...) must be skipped and named with a
reason matching the table's pattern, and nothing may crash. `count` beyond the table adds seeded
variants (random truncations, random bytes, random odd photos).

`campaign(directory, count)` writes the corpus under `directory`, then runs it through
`data.folder.prepare_folder` plus one epoch of the tf.data train and eval datasets, and through
`python -m disco_jax.inference.colorize` (its `main`, in process) with a tiny random model at work size 32,
and classifies every file's outcome on both paths.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import struct
import sys
import zlib

import numpy as np
from PIL import Image, ImageOps

OK, BAD = 'ok', 'bad'
SEED = 0  # the generated variants are a pure function of (SEED, index)
WORK_SIZE = 32  # colorize --size: the smallest legal one keeps the campaign fast
# A tiny random DISCO (the sizes of tests/test_colorize.py): what is tested is reading, not colours.
TINY = dict(spix_width=4, backbone_width=8, refine_width=8, d_model=16, num_layers=2, num_heads=2,
            ffn_dim=32, num_anchors=3)
# One 8-bit step moves sRGB lightness by at most ~0.56 L and rounding is half a step per channel,
# so 0.6 L bounds the error of an output whose L is exact (as in tests/test_colorize.py).
L_TOL = 0.6
# TF's and PIL's JPEG decoders (different IDCTs) may differ by a few 8-bit levels per pixel.
JPEG_DECODER_TOL = 4.0  # mean absolute difference, 8-bit levels

# Reasons a skip must give (regexes, searched case-insensitively in the error text).
_UNREADABLE = r'cannot identify image file'
_TRUNCATED = r'truncated|cannot identify image file'
_MISSING = r'no such file'
_BOMB = r'megapixels, over the limit'
_NOT_REGULAR = r'not a regular file'


@dataclasses.dataclass(frozen=True)
class Case:
  """One corpus file and what must happen to it."""
  name: str  # path relative to the corpus directory
  expected: str  # OK (kept and colorized) or BAD (skipped and named)
  why: str  # what the file is, and why it is classed so
  size: tuple = None  # OK: (W, H) as displayed, i.e. after the EXIF rotation
  reason: str = None  # BAD: regex the skip's reason must match
  bright: str = None  # the displayed corner ('tl', 'tr', 'bl', 'br') that holds the bright block


# ----------------------------------------------------------------------------- file contents

def photo(h, w, seed=0):
  """A photo stand-in `(h, w, 3)` uint8: smooth colour gradients plus noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = np.stack([xx / max(w, 1), yy / max(h, 1), 0.5 + 0.5 * np.sin(xx / 7.0)], -1) * 200 + 20
  return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _bright_corner(h, w):
  """`(h, w, 3)` uint8: a bright top-left quarter on a dark photo, to see where rotations put it."""
  img = photo(h, w) // 4
  img[:h // 2, :w // 2] = 230
  return img


def _encode(image, fmt, **params):
  """A PIL image or `(h, w[, c])` array encoded as `fmt` bytes."""
  img = image if isinstance(image, Image.Image) else Image.fromarray(image)
  out = io.BytesIO()
  img.save(out, format=fmt, **params)
  return out.getvalue()


def _png_chunk(kind, data, crc=None):
  crc = zlib.crc32(kind + data) if crc is None else crc
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)


def _png(width, height, bit_depth, colour_type, rows):
  """A PNG written by hand (PIL cannot write 16-bit RGB): `rows` the filtered scanline bytes."""
  ihdr = struct.pack('>IIBBBBB', width, height, bit_depth, colour_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
          + _png_chunk(b'IDAT', zlib.compress(rows)) + _png_chunk(b'IEND', b''))


def _rgb16_png():
  h, w = 24, 40
  yy, xx = np.mgrid[:h, :w]
  rgb = np.stack([xx * 1600, yy * 2700, (xx + yy) * 1000], -1).astype('>u2')  # (h, w, 3) 16-bit
  return _png(w, h, 16, 2, b''.join(b'\0' + row.tobytes() for row in rgb))


def _bomb_png():
  """A PNG header claiming 100000 x 100000 RGB pixels (30 GB decoded) with one row of data."""
  return _png(100_000, 100_000, 8, 2, b'\0' * (1 + 3 * 100_000))


def _bomb_jpeg():
  """A real 64x48 JPEG whose frame header is patched to claim 65535 x 65535 pixels."""
  data = bytearray(_encode(photo(48, 64), 'JPEG'))
  sof = data.index(b'\xff\xc0')
  data[sof + 5:sof + 9] = struct.pack('>HH', 65535, 65535)  # after marker, length, precision
  return bytes(data)


def _png_bad_crc(chunk):
  """A PNG whose `chunk` (b'IHDR' or b'IDAT') has its CRC flipped."""
  data = bytearray(_encode(photo(24, 32), 'PNG'))
  at = data.index(chunk)
  length = struct.unpack('>I', data[at - 4:at])[0]
  data[at + 4 + length] ^= 0xff  # first CRC byte
  return bytes(data)


def _png_without_iend():
  """A PNG cut right after its pixel data: every pixel is there, only the end marker is not."""
  data = _encode(photo(30, 40), 'PNG')
  return data[:data.rindex(b'IEND') - 4]


def _jpeg_marker_in_scan():
  """A JPEG whose first stuffed 0xFF00 in the entropy data became 0xFFE4 (an APP4 marker).

  libjpeg warns and PIL decodes it; TensorFlow's decoder refuses it. So the image-folder dataset
  must not store its bytes for tf.data to decode (it stores the pixels PIL read).
  """
  data = bytearray(_encode(photo(64, 96, seed=3), 'JPEG', quality=95))
  stuffed = data.index(b'\xff\x00', data.index(b'\xff\xda') + 2)
  data[stuffed + 1] = 0xe4
  return bytes(data)


def _exif_jpeg(orientation, h=32, w=48):
  exif = Image.Exif()
  exif[0x0112] = orientation
  return _encode(_bright_corner(h, w), 'JPEG', quality=95, exif=exif.tobytes())


def _animated_gif():
  frames = [Image.fromarray(photo(30, 40, seed=s)).convert('P') for s in range(3)]
  out = io.BytesIO()
  frames[0].save(out, format='GIF', save_all=True, append_images=frames[1:], duration=50, loop=0)
  return out.getvalue()


def _rgba_png():
  rgba = np.concatenate([photo(36, 48), np.full((36, 48, 1), 255, np.uint8)], -1)
  rgba[:, :24, 3] = 0  # left half fully transparent
  rgba[:18, 24:, 3] = 128
  return _encode(rgba, 'PNG')


def _palette_png_with_transparency():
  img = Image.fromarray(photo(28, 36, seed=2)).convert('P')
  return _encode(img, 'PNG', transparency=0)


def _base_cases():
  """[(Case, bytes | callable(path) writing the file)]: the fixed corpus table."""
  jpeg = _encode(photo(48, 64), 'JPEG')
  png = _encode(photo(40, 56, seed=1), 'PNG')

  def link(target):
    return lambda path: os.symlink(target, path)

  def directory_entry(path):  # 'dir.jpg/' is a directory; the photo inside must be found
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(png)

  cases = [
      # --- bad: nothing readable in them
      (Case('empty.jpg', BAD, 'empty file', reason=_UNREADABLE), b''),
      (Case('empty.png', BAD, 'zero-byte PNG', reason=_UNREADABLE), b''),
      (Case('trunc_jpeg_2.jpg', BAD, 'JPEG cut after its SOI marker', reason=_TRUNCATED), jpeg[:2]),
      (Case('trunc_jpeg_100.jpg', BAD, 'JPEG cut inside its tables', reason=_TRUNCATED),
       jpeg[:100]),
      (Case('trunc_jpeg_half.jpg', BAD, 'JPEG cut half-way through the scan', reason=_TRUNCATED),
       jpeg[:len(jpeg) // 2]),
      (Case('trunc_jpeg_minus1.jpg', BAD, 'JPEG missing its last byte', reason=_TRUNCATED),
       jpeg[:-1]),
      (Case('trunc_png_8.png', BAD, 'PNG signature only', reason=_TRUNCATED), png[:8]),
      (Case('trunc_png_40.png', BAD, 'PNG cut after its header', reason=_TRUNCATED), png[:40]),
      (Case('trunc_png_half.png', BAD, 'PNG cut half-way through IDAT', reason=_TRUNCATED),
       png[:len(png) // 2]),
      (Case('text.jpg', BAD, 'plain text named .jpg', reason=_UNREADABLE),
       b'These are not the pixels you are looking for.\n' * 20),
      (Case('random.png', BAD, 'random bytes named .png', reason=_UNREADABLE),
       np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
      (Case('pdf.jpg', BAD, 'a PDF header named .jpg', reason=_UNREADABLE),
       b'%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n'),
      (Case('zip.jpg', BAD, 'a zip archive named .jpg', reason=_UNREADABLE),
       b'PK\x03\x04\x14\x00\x00\x00\x08\x00' + bytes(100)),
      (Case('tiff_header_only.tif', BAD, 'a TIFF byte-order mark and nothing else',
            reason=_TRUNCATED), b'II*\x00\x08\x00\x00\x00'),
      (Case('bmp_header_only.bmp', BAD, 'a BMP file header without pixels', reason=_TRUNCATED),
       _encode(photo(8, 8), 'BMP')[:30]),
      (Case('bomb.png', BAD, 'PNG header claiming 100000x100000 pixels: over read_photo\'s '
            'max_pixels, refused from the header before any allocation', reason=_BOMB),
       _bomb_png()),
      (Case('bomb.jpg', BAD, 'JPEG frame claiming 65535x65535 pixels', reason=_BOMB),
       _bomb_jpeg()),
      (Case('bad_crc_ihdr.png', BAD, 'PNG whose header chunk fails its CRC',
            reason=_UNREADABLE), _png_bad_crc(b'IHDR')),
      (Case('missing_link.jpg', BAD, 'symlink to a file that does not exist', reason=_MISSING),
       link('no_such_photo.jpg')),
      (Case('loop.jpg', BAD, 'symlink to itself', reason=r'too many levels of symbolic links'),
       link('loop.jpg')),
      (Case('zero.jpg', BAD, 'symlink to /dev/zero, an endless device', reason=_NOT_REGULAR),
       link('/dev/zero')),
      (Case('pipe.jpg', BAD, 'a named pipe (FIFO): opening it to read would wait for a writer '
            'forever', reason=_NOT_REGULAR), os.mkfifo),
      # --- ok: odd but readable
      (Case('cmyk.jpg', OK, 'CMYK JPEG', size=(44, 36)),
       _encode(Image.fromarray(photo(36, 44)).convert('CMYK'), 'JPEG')),
      (Case('grey16.png', OK, '16-bit greyscale PNG (scaled to 8 bits, not clipped)',
            size=(50, 20)),
       _encode(Image.fromarray((np.mgrid[:20, :50][1] * 1300).astype(np.uint16)), 'PNG')),
      (Case('rgb16.png', OK, '16-bit RGB PNG (PIL keeps the high byte of each sample)',
            size=(40, 24)), _rgb16_png()),
      (Case('rgba.png', OK, 'RGBA PNG, half transparent (alpha ignored, colour kept)',
            size=(48, 36)), _rgba_png()),
      (Case('palette.png', OK, 'palette (P mode) PNG', size=(36, 28)),
       _encode(Image.fromarray(photo(28, 36, seed=2)).convert('P'), 'PNG')),
      (Case('palette_transparent.png', OK, 'palette PNG with a transparent index', size=(36, 28)),
       _palette_png_with_transparency()),
      (Case('palette.gif', OK, 'GIF', size=(40, 30)),
       _encode(Image.fromarray(photo(30, 40, seed=4)).convert('P'), 'GIF')),
      (Case('animated.gif', OK, 'animated GIF, 3 frames (the first is used)', size=(40, 30)),
       _animated_gif()),
      (Case('grey.jpg', OK, 'greyscale (L) JPEG', size=(40, 32)),
       _encode(Image.fromarray(photo(32, 40)).convert('L'), 'JPEG')),
      (Case('la.png', OK, 'greyscale with alpha (LA) PNG', size=(30, 20)),
       _encode(Image.fromarray(photo(20, 30)).convert('LA'), 'PNG')),
      (Case('bilevel.png', OK, '1-bit PNG', size=(33, 17)),
       _encode(Image.fromarray(photo(17, 33)).convert('1'), 'PNG')),
      (Case('bilevel.tif', OK, '1-bit TIFF, CCITT group 4', size=(40, 24)),
       _encode(Image.fromarray(photo(24, 40)).convert('1'), 'TIFF', compression='group4')),
      (Case('one_pixel.png', OK, '1x1 PNG', size=(1, 1)), _encode(photo(1, 1), 'PNG')),
      (Case('one_pixel.jpg', OK, '1x1 JPEG', size=(1, 1)), _encode(photo(1, 1), 'JPEG')),
      (Case('two_by_two.png', OK, '2x2 PNG', size=(2, 2)), _encode(photo(2, 2), 'PNG')),
      (Case('three_by_five.jpg', OK, '3x5 JPEG', size=(3, 5)), _encode(photo(5, 3), 'JPEG')),
      (Case('wide_20000x10.png', OK, '20000x10 PNG', size=(20000, 10)),
       _encode(photo(10, 20000), 'PNG')),
      (Case('tall_10x20000.jpg', OK, '10x20000 JPEG', size=(10, 20000)),
       _encode(photo(20000, 10), 'JPEG')),
      (Case('exif6.jpg', OK, 'EXIF orientation 6: 48x32 stored, shown rotated 90 degrees '
            'clockwise', size=(32, 48), bright='tr'), _exif_jpeg(6)),
      (Case('exif3.jpg', OK, 'EXIF orientation 3: shown rotated 180 degrees', size=(48, 32),
            bright='br'), _exif_jpeg(3)),
      (Case('exif8.jpg', OK, 'EXIF orientation 8: shown rotated 90 degrees counter-clockwise',
            size=(32, 48), bright='bl'), _exif_jpeg(8)),
      (Case('exif1.jpg', OK, 'EXIF orientation 1 (upright): stored as its own JPEG bytes',
            size=(48, 32), bright='tl'), _exif_jpeg(1)),
      (Case('exif9.jpg', OK, 'EXIF orientation 9, not a valid value: left as stored',
            size=(48, 32), bright='tl'), _exif_jpeg(9)),
      (Case('café photo ünï.jpg', OK, 'spaces and non-ASCII characters in the name',
            size=(64, 48)), jpeg),
      (Case(os.path.join('dir.jpg', 'inside.png'), OK, 'a directory named dir.jpg is walked, '
            'not read as an image; the photo inside it is used', size=(56, 40)), directory_entry),
      (Case('link_to_photo.jpg', OK, 'symlink to a readable photo', size=(64, 48)),
       link('café photo ünï.jpg')),
      (Case('photo.webp', OK, 'lossy WebP', size=(44, 30)),
       _encode(photo(30, 44), 'WEBP', quality=90)),
      (Case('photo_lossless.webp', OK, 'lossless WebP', size=(44, 30)),
       _encode(photo(30, 44), 'WEBP', lossless=True)),
      (Case('photo.bmp', OK, 'BMP', size=(30, 22)), _encode(photo(22, 30), 'BMP')),
      (Case('photo.tiff', OK, 'LZW-compressed TIFF', size=(42, 26)),
       _encode(photo(26, 42), 'TIFF', compression='tiff_lzw')),
      (Case('progressive.jpg', OK, 'progressive JPEG', size=(64, 48)),
       _encode(photo(48, 64), 'JPEG', progressive=True)),
      (Case('jpeg_named.png', OK, 'a JPEG named .png (read by its content)', size=(64, 48)),
       jpeg),
      (Case('png_named.jpg', OK, 'a PNG named .jpg (read by its content)', size=(56, 40)), png),
      (Case('UPPER.JPG', OK, 'upper-case .JPG extension', size=(64, 48)), jpeg),
      (Case('UPPER.PNG', OK, 'upper-case .PNG extension', size=(56, 40)), png),
      (Case('Mixed.JpEg', OK, 'mixed-case .JpEg extension', size=(64, 48)), jpeg),
      (Case('trailing_garbage.jpg', OK, 'a JPEG followed by 1 kB of junk after its end marker',
            size=(64, 48)), jpeg + bytes(range(256)) * 4),
      (Case('png_no_iend.png', OK, 'PNG cut just after its pixel data (only IEND missing)',
            size=(40, 30)), _png_without_iend()),
      (Case('bad_crc_idat.png', OK, 'PNG whose pixel chunk fails its CRC: PIL does not check '
            'it and zlib\'s own checksum holds, so every pixel is intact', size=(32, 24)),
       _png_bad_crc(b'IDAT')),
      (Case('marker_in_scan.jpg', OK, 'JPEG with a stray marker in its entropy data: PIL '
            'decodes it, TensorFlow refuses it', size=(96, 64)), _jpeg_marker_in_scan()),
  ]
  if os.geteuid() != 0:  # root reads any file, so the case means nothing there
    def unreadable(path):
      with open(path, 'wb') as f:
        f.write(jpeg)
      os.chmod(path, 0)
    cases.append((Case('no_permission.jpg', BAD, 'a photo without read permission',
                       reason=r'permission denied'), unreadable))
  return cases


def _variant(index):
  """(Case, bytes) of generated variant `index` (seeded by SEED and index): a random truncation
  of a JPEG or PNG, random bytes, or a random odd-but-readable photo."""
  rng = np.random.default_rng([SEED, index])
  kind = index % 4
  h, w = (int(v) for v in rng.integers(1, 80, 2))
  if kind == 0:
    data = _encode(photo(max(h, 8), max(w, 8), seed=index), 'JPEG')
    # PIL refuses every cut of a baseline JPEG short of the whole file (checked on 40 photos).
    return (Case(f'gen_{index:05d}_trunc.jpg', BAD, 'randomly truncated JPEG', reason=_TRUNCATED),
            data[:int(rng.integers(0, len(data) - 1))])
  if kind == 1:
    data = _encode(photo(max(h, 8), max(w, 8), seed=index), 'PNG')
    # PIL reads a PNG cut at most 6 bytes before the end of its pixel data (zlib's checksum and
    # the end of the stream; checked on 40 photos): cut 16 bytes or more before it.
    idat_end = data.rindex(b'IEND') - 4 - 4  # minus IEND's length and IDAT's CRC
    return (Case(f'gen_{index:05d}_trunc.png', BAD, 'randomly truncated PNG', reason=_TRUNCATED),
            data[:int(rng.integers(0, idat_end - 16))])
  if kind == 2:
    # Random bytes cannot start with an image signature by chance: the first byte is not one.
    data = bytes([0x20]) + rng.integers(0, 256, int(rng.integers(0, 5000)), np.uint8).tobytes()
    ext = ('.jpg', '.png', '.webp', '.bmp')[int(rng.integers(4))]
    return Case(f'gen_{index:05d}_random{ext}', BAD, 'random bytes', reason=_UNREADABLE), data
  mode = ('L', 'P', 'RGBA', 'CMYK', 'LA', '1')[int(rng.integers(6))]
  fmt, ext = {'CMYK': ('JPEG', '.jpg')}.get(mode, ('PNG', '.png'))
  img = Image.fromarray(photo(h, w, seed=index)).convert(mode)
  return Case(f'gen_{index:05d}_{mode}{ext}', OK, f'random {w}x{h} {mode} photo', size=(w, h)), \
      _encode(img, fmt)


def corpus_cases(count=None):
  """[(Case, content)] of a corpus of `count` files (None: the base table only).

  The base table comes first; more files are generated variants.
  """
  cases = _base_cases()
  count = len(cases) if count is None else count
  if count < len(cases):
    raise ValueError(f'count={count}: the base corpus alone has {len(cases)} files')
  return cases + [_variant(i) for i in range(count - len(cases))]


def write_cases(directory, count=None):
  """Writes the corpus into `directory` (created, or empty): [(path, Case)]."""
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f'{directory} is not empty: write the corpus into a new directory')
  os.makedirs(directory, exist_ok=True)
  written = []
  for case, content in corpus_cases(count):
    path = os.path.join(directory, case.name)
    if callable(content):
      content(path)
    else:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb') as f:
        f.write(content)
    written.append((path, case))
  return written


def write_corpus(directory, count=None):
  """Writes the corpus into `directory`: [(path, 'ok' | 'bad')] (see the module docstring)."""
  return [(path, case.expected) for path, case in write_cases(directory, count)]


# ----------------------------------------------------------------------------- reference reading

def reference_rgb(path):
  """What an 'ok' file shows, read independently of disco_jax: `(H, W, 3)` uint8, EXIF applied,
  16-bit greyscale scaled by 1/257 (not clipped), alpha dropped (colour kept)."""
  with Image.open(path) as img:
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith('I;16') or img.mode == 'I':
      grey = np.rint(np.asarray(img, np.float64) / 257.0).astype(np.uint8)
      return np.repeat(grey[..., None], 3, -1)
    return np.asarray(img.convert('RGB'))


def lightness(rgb):
  """uint8 RGB `(..., 3)` -> CIE L `(...)` (disco_jax.ops.colour's OpenCV-float conversion)."""
  from disco_jax.ops import colour  # pylint: disable=import-outside-toplevel
  return colour.rgb_to_lab(rgb.astype(np.float64) / 255.0)[..., 0]


def corner_means(lum):
  """Mean of each quarter of a lightness map `(H, W)`: {'tl': ..., 'tr': ..., ...}."""
  h, w = lum.shape
  hh, hw = max(h // 2, 1), max(w // 2, 1)
  return {'tl': lum[:hh, :hw].mean(), 'tr': lum[:hh, -hw:].mean(),
          'bl': lum[-hh:, :hw].mean(), 'br': lum[-hh:, -hw:].mean()}


def check_output(case, rgb):
  """'' if `rgb` `(H, W, 3)` (stored or colorized) has the shape the 'ok' `case` is displayed
  at and its bright block in the table's corner, else what is wrong."""
  want_w, want_h = case.size
  if rgb.shape != (want_h, want_w, 3):
    return f'shape {rgb.shape}, expected {(want_h, want_w, 3)} (W, H = {case.size})'
  if case.bright:
    corners = corner_means(lightness(rgb))
    if max(corners, key=corners.get) != case.bright:
      return f'the bright block is not at {case.bright!r}: corner lightness {corners}'
  return ''


# ----------------------------------------------------------------------------- campaign

def _tiny_variables(directory):
  """Path of the tiny random model's variables file (written once into `directory`)."""
  # disco_jax (JAX, TensorFlow) is imported only here and below: writing a corpus needs neither.
  from disco_jax.models import disco  # pylint: disable=import-outside-toplevel
  from disco_jax.weights import convert  # pylint: disable=import-outside-toplevel
  path = os.path.join(directory, 'tiny.msgpack')
  if not os.path.exists(path):
    convert.save_variables(path, disco.init_variables(disco.DISCO(**TINY), 0))
  return path


def _folder_config(folder, data_dir, num_images, seed=0):
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict()
  config.seed = seed
  batch = max(1, min(4, num_images))
  config.input = ml_collections.ConfigDict(dict(
      dataset='folder', data_dir=data_dir, folder=folder, train_split='train', eval_split='train',
      image_size=WORK_SIZE, resize='random_crop', crop_min_scale=0.5, random_flip=True,
      global_batch_size=batch, shuffle_buffer=16, prefetch=2))
  return config


def run_folder(folder, cases, data_dir):
  """Runs the corpus through the image-folder dataset: {path: (outcome, detail)}, crash messages.

  outcome: 'kept' (in the dataset, with `detail` '' or what is wrong with the stored image),
  'skipped' (`detail`: the report's reason), 'absent' (in neither), or 'crash' (the scan or a
  tf.data pass raised; `detail` the exception).
  """
  from disco_jax.data import folder as folder_lib  # pylint: disable=import-outside-toplevel
  from disco_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  crashes = []
  try:
    report = folder_lib.prepare_folder(folder, data_dir)
  except Exception as e:  # pylint: disable=broad-except  # any exception here is a finding
    return {p: ('crash', repr(e)) for p, _ in cases}, [f'prepare_folder: {e!r}']
  config = _folder_config(folder, data_dir, report.num_images)
  builder = pipeline.dataset_builder(config)
  stored = {}
  try:
    for ex in tfds.as_numpy(builder.as_dataset(split='train', shuffle_files=False)):
      stored[ex['file_name'].decode()] = ex['image']
    # One epoch through the training pipeline (crops, flips) and one eval pass: every kept
    # record is decoded by tf.data here, as in training.
    batch = config.input.global_batch_size
    train = pipeline.local_train_dataset(config).take(report.num_images // batch)
    n_train = sum(b['gray'].shape[0] for b in train.as_numpy_iterator())
    n_eval = sum(int(b['mask'].sum()) for b in pipeline.local_eval_dataset(config).as_numpy_iterator())
    if n_train != report.num_images // batch * batch or n_eval != report.num_images:
      crashes.append(f'tf.data gave {n_train} training and {n_eval} eval examples for '
                     f'{report.num_images} kept files')
  except Exception as e:  # pylint: disable=broad-except
    crashes.append(f'tf.data pass: {e!r}')
  skipped = dict(report.skipped)
  outcomes = {}
  for path, case in cases:
    rel = os.path.relpath(path, folder)
    if crashes:
      outcomes[path] = ('crash', crashes[0])
    elif rel in stored:
      outcomes[path] = ('kept', _stored_problem(case, path, stored[rel]))
    elif path in skipped:
      outcomes[path] = ('skipped', skipped[path])
    else:
      outcomes[path] = ('absent', 'neither kept nor named in FolderReport.skipped')
  return outcomes, crashes


def _stored_problem(case, path, image):
  """'' if the dataset's decoded image `(H, W, 3)` uint8 is right for the 'ok' `case`."""
  if case.expected != OK:
    return ''
  problem = check_output(case, image)
  if problem:
    return problem
  diff = np.abs(image.astype(np.float64) - reference_rgb(path)).mean()
  if diff > JPEG_DECODER_TOL:
    return f'stored pixels differ from the file\'s by {diff:.1f} levels on average'
  return ''


def run_colorize(folder, cases, out_dir, variables_path):
  """Runs `python -m disco_jax.inference.colorize` (its main, in process) over the corpus folder.

  -> ({path: (outcome, detail)}, crash messages, exit status). outcome: 'colorized' (`detail`
  '' or what is wrong with the output), 'rejected' (`detail`: the error line naming the file),
  'absent', or 'crash'.
  """
  from disco_jax.inference import colorize  # pylint: disable=import-outside-toplevel
  argv = ['--variables', variables_path, '--model', json.dumps(TINY), '--size', str(WORK_SIZE),
          # One compiled batch for the whole corpus: the campaign tests reading, and every
          # other batch size would cost a compilation.
          '--input', folder, '--output', out_dir, '--batch', str(max(1, len(cases)))]
  err, out = io.StringIO(), io.StringIO()
  crashes, status = [], None
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      status = colorize.main(argv)
  except BaseException as e:  # pylint: disable=broad-except  # SystemExit included: a finding
    crashes.append(f'colorize.main: {e!r}')
  if status not in (None, 0, 1):  # 2: the command refused its arguments or the model
    crashes.append(f'colorize exited with {status}: {err.getvalue().strip()[:500]}')
  stems = dict(colorize.list_inputs(folder))
  errors = err.getvalue().splitlines()
  outcomes = {}
  for path, case in cases:
    line = next((l for l in errors if f'{path}:' in l), None)
    out_path = os.path.join(out_dir, stems[path] + '.png') if path in stems else None
    if line is not None:
      outcomes[path] = ('rejected', line)
    elif out_path and os.path.exists(out_path):
      with Image.open(out_path) as img:
        rgb = np.asarray(img.convert('RGB'))
      outcomes[path] = ('colorized', _colorized_problem(case, path, rgb))
    elif crashes:
      outcomes[path] = ('crash', crashes[0])
    else:
      outcomes[path] = ('absent', 'no output and no error line naming it')
  return outcomes, crashes, status


def _colorized_problem(case, path, rgb):
  if case.expected != OK:
    return ''
  problem = check_output(case, rgb)
  if problem:
    return problem
  error = np.abs(lightness(rgb) - lightness(reference_rgb(path))).max()
  if error > L_TOL:
    return f'output L differs from the input\'s by up to {error:.2f} (tolerance {L_TOL})'
  return ''


def classify(cases, folder, colorized):
  """Scores every file against its expectation on both paths (pure; see `campaign`).

  cases: [(path, Case)]; folder, colorized: {path: (outcome, detail)} from run_folder and
  run_colorize. -> (counts, [per-file dict]).
  """
  counts = dict(files_tried=len(cases), rejected_with_clear_error=0, colorized=0, crashes=0,
                wrong=0)
  details = []
  for path, case in cases:
    (f_out, f_detail), (c_out, c_detail) = folder[path], colorized[path]
    problems = []
    for where, outcome, detail in (('folder', f_out, f_detail), ('colorize', c_out, c_detail)):
      if outcome in ('crash', 'absent'):
        problems.append(f'{where}: {outcome}: {detail}')
      elif case.expected == OK and outcome not in ('kept', 'colorized'):
        problems.append(f'{where}: an ok file was {outcome}: {detail}')
      elif case.expected == OK and detail:
        problems.append(f'{where}: {detail}')
      elif case.expected == BAD and outcome in ('kept', 'colorized'):
        problems.append(f'{where}: a bad file was {outcome}')
      elif case.expected == BAD and not re.search(case.reason, detail, re.IGNORECASE | re.DOTALL):
        problems.append(f'{where}: the reason {detail!r} does not match {case.reason!r}')
    if 'crash' in (f_out, c_out):
      counts['crashes'] += 1
    if problems:
      counts['wrong'] += 1
    elif case.expected == OK:
      counts['colorized'] += 1
    else:
      counts['rejected_with_clear_error'] += 1
    details.append(dict(path=path, expected=case.expected, why=case.why, folder=f_out,
                        folder_detail=f_detail, colorize=c_out, colorize_detail=c_detail,
                        problems=problems))
  return counts, details


def campaign(directory, count=None):
  """Writes the corpus under `directory` (new or empty) and runs it through both readers.

  -> dict(files_tried, rejected_with_clear_error (bad files skipped by both paths with the
  table's reason), colorized (ok files kept and colorized correctly), crashes (files whose run
  ended in an uncaught exception, plus runs that raised), wrong (files whose outcome on either
  path disagrees with the table), details (per file), exit_status (colorize's), run_crashes).
  """
  directory = os.path.abspath(directory)
  folder = os.path.join(directory, 'corpus')
  cases = write_cases(folder, count)
  variables_path = _tiny_variables(directory)
  folder_outcomes, folder_crashes = run_folder(folder, cases, os.path.join(directory, 'tfds'))
  colorize_outcomes, colorize_crashes, status = run_colorize(
      folder, cases, os.path.join(directory, 'out'), variables_path)
  counts, details = classify(cases, folder_outcomes, colorize_outcomes)
  run_crashes = folder_crashes + colorize_crashes
  if run_crashes and not counts['crashes']:
    counts['crashes'] = len(run_crashes)  # a run raised without costing any file its outcome
  return dict(counts, details=details, exit_status=status, run_crashes=run_crashes)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('directory')
  p.add_argument('--count', type=int, help='files in the corpus (default: the base table)')
  p.add_argument('--campaign', action='store_true', help='also run both readers over it')
  args = p.parse_args(argv)
  if not args.campaign:
    for path, expected in write_corpus(args.directory, args.count):
      print(expected, path)
    return 0
  result = campaign(args.directory, args.count)
  for d in result['details']:
    if d['problems']:
      print(d['path'], *d['problems'], sep='\n  ')
  print({k: v for k, v in result.items() if k != 'details'})
  return 1 if result['crashes'] or result['wrong'] else 0


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
