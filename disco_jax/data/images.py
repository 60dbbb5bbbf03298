"""The one photo reader: image files -> upright 8-bit RGB, for training data and colorization alike.

Training folders (`data.folder`) and the colorize command read files through `read_photo`, so both
accept the same files (the same extensions, modes and EXIF orientation) and refuse the rest with
the same `UnreadableImage` message.
"""
import os

import numpy as np
from PIL import Image, ImageOps

Image.init()  # registers every plugin, so registered_extensions() lists all formats PIL can read
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif') + tuple(
    ext for ext in ('.bmp', '.webp', '.tif', '.tiff') if ext in Image.registered_extensions())
# Refuse images over this many pixels before decoding: PIL's own refusal threshold (twice its
# Image.MAX_IMAGE_PIXELS, 89.5 Mpx), so what PIL read before is still read. Colorizing needs about
# 10 bytes of memory per pixel (the decoded copies, the input and the output).
MAX_PIXELS = 178_956_970
# read_photo's max_pixels is the decompression-bomb guard, so PIL's own must not refuse (or warn
# about) a larger limit the caller chose.
Image.MAX_IMAGE_PIXELS = None
_EXIF_ORIENTATION = 0x0112
# Integer greyscale modes PIL opens 16-bit files in: convert('RGB') would clip them at 255.
_WIDE_GREY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


class UnreadableImage(ValueError):
  """A file that is not an image this reader can decode, named with the reason."""


def read_photo(path, max_pixels: int = MAX_PIXELS):
  """An image file -> (`(H, W, 3)` uint8 RGB upright as its EXIF says, is_plain_rgb_jpeg).

  Greyscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB (16-bit scaled, not clipped);
  an animated GIF gives its first frame. `is_plain_rgb_jpeg` says the file's own bytes decode to
  these pixels (an RGB JPEG with no EXIF rotation), so a dataset may keep them unchanged.

  Raises `UnreadableImage` naming the file for anything PIL cannot read: empty, truncated, not an
  image, more than `max_pixels` pixels (checked from the header, before decoding: the
  decompression-bomb guard), a pipe, socket or device (which would block or never end), a dangling
  link.
  """
  if os.path.exists(path) and not os.path.isfile(path):
    raise UnreadableImage(f'{path}: cannot read the image (not a regular file but a pipe, socket '
                          'or device, which would block or never end)')
  try:
    with Image.open(path) as img:
      width, height = img.size
      if width * height > max_pixels:
        raise UnreadableImage(
            f'{path}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit '
            f'of {max_pixels / 1e6:.1f} (max_pixels; the colorize command\'s --max-pixels): '
            'raise it if the machine has about 10 bytes of memory per pixel')
      plain_jpeg = (img.format == 'JPEG' and img.mode == 'RGB'
                    and img.getexif().get(_EXIF_ORIENTATION, 1) == 1)
      img.load()  # decodes the whole file, so truncation raises here
      ImageOps.exif_transpose(img, in_place=True)  # in place: no second decoded copy
      if img.mode in _WIDE_GREY_MODES:
        grey = np.rint(np.asarray(img, np.float64) / 257.0)
        img = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
      if img.mode == 'L':  # as convert('RGB'), without PIL's 4-byte RGB copy of a large grey scan
        return np.repeat(np.asarray(img)[..., None], 3, -1), plain_jpeg
      return np.asarray(img.convert('RGB')), plain_jpeg
  # PIL raises many unrelated types for bad files (OSError, ValueError, SyntaxError, struct.error,
  # ...): all mean the same to a caller.
  except UnreadableImage:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableImage(f'{path}: cannot read the image ({type(e).__name__}: {e})') from e


def read_rgb(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """An image file -> `(H, W, 3)` uint8 RGB, upright (see `read_photo`)."""
  return read_photo(path, max_pixels)[0]


def list_images(folder):
  """Image files under `folder` (by extension, any case), walked recursively and sorted."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    found += [os.path.join(root, f) for f in sorted(files)
              if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
  return found
