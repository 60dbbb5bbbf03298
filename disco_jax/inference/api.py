"""The three-line Python API:

  from disco_jax import Colorizer
  colorizer = Colorizer.load('disco-beta.pth.tar')   # or a converted .msgpack, or a training workdir
  rgb = colorizer('old_photo.jpg')                     # (H, W, 3) uint8, the photo's size and L

The work is `colorize.colorize_arrays`'s (the official demo's recipe); the jitted halves of the
model are cached per model and compiled once per work size, so later calls at the same size and
anchor count reuse them.
"""
import os
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image

from disco_jax.data import images
from disco_jax.inference import colorize
from disco_jax.models import disco


def as_rgb(image) -> np.ndarray:
  """A path, a PIL image or a numpy array `(H, W)`, `(H, W, 1)` or `(H, W, 3)` (uint8, or float in
  [0, 1]) -> RGB `(H, W, 3)` uint8 (floats rounded to 8 bits, as the output is). Paths go through
  the one photo reader (EXIF orientation respected); a PIL image is taken as it is."""
  if isinstance(image, (str, os.PathLike)):
    return images.read_rgb(os.fspath(image))
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'))
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3):
    raise ValueError(f'image of shape {array.shape}: expected (H, W), (H, W, 1) or (H, W, 3)')
  array = np.broadcast_to(array, array.shape[:2] + (3,))
  if array.dtype == np.uint8:
    return array
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f'image of dtype {array.dtype}: expected uint8, or float in [0, 1]')
  if not (np.all(np.isfinite(array)) and array.min() >= 0.0 and array.max() <= 1.0):
    raise ValueError(f'float image with values in [{np.nanmin(array)}, {np.nanmax(array)}]: '
                     'expected [0, 1] (divide 8-bit values by 255)')
  return np.rint(array * 255.0).astype(np.uint8)


class Colorizer:
  """A DISCO model with its weights, called on one image at a time."""

  def __init__(self, model: disco.DISCO, variables):
    self.model = model
    # On the device once, not at every call.
    self.variables = jax.device_put(variables)

  @classmethod
  def load(cls, path, model: Optional[dict] = None) -> 'Colorizer':
    """From a converted `.msgpack`, an official `.pth`/`.pth.tar` (read without torch, refusing any
    file that asks to run code) or a training workdir (its latest checkpoint and saved sizes).

    `model`: the DISCO fields of a weights file whose sizes are not the released model's, e.g.
    `{'d_model': 32, 'num_layers': 2}`; a workdir carries its own.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      if model:
        raise ValueError(f'{path} is a training workdir, which carries its own model sizes: '
                         'leave model= out')
      from disco_jax.training import trainer  # pylint: disable=g-import-not-at-top
      config, variables = trainer.load_trained(path)
      return cls(colorize.local_model(config.model), variables)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such file or workdir (expected a .msgpack, an official '
                              '.pth/.pth.tar, or a training workdir)')
    return cls(*colorize.load_weights(path, model))

  def __call__(self, image, anchors: int = 8, seed: int = colorize.OFFICIAL_SEED,
               size: int = 256, hints: Optional[Sequence[dict]] = None, diverse: int = 0):
    """Colorizes `image` (see `as_rgb`): RGB `(H, W, 3)` uint8 at its size, with its lightness.

    anchors: k of the k-means anchors (3..14); seed: their seed (130: the official inference's);
    size: the work size, a multiple of 16 (256 as trained, or 512); hints: anchor colours as
    `colorize`'s --hints entries (`{"anchor": i, "rgb": [r, g, b]}` or `{"pixel": [x, y], "rgb":
    ...}`); diverse: 0 for one image, N > 0 for a list of N alternatives (3: the official top-10
    rule, others sampled).
    """
    low, high = colorize.ANCHOR_RANGE
    if not low <= anchors <= high:
      raise ValueError(f'anchors={anchors}: must be in {low}..{high}')
    if diverse < 0:
      raise ValueError(f'diverse={diverse}: must be 0 (one image) or the number of alternatives')
    model = self.model.clone(num_anchors=anchors)
    (result,) = colorize.colorize_arrays(model, self.variables, [as_rgb(image)], size,
                                         jax.random.key(seed), max(diverse, 1), [hints or []])
    return result.images if diverse else result.images[0]
