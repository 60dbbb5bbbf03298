"""Colorize photos of any size with a trained DISCO model (the official demo's recipe).

  python -m disco_jax.inference.colorize --variables disco.msgpack --input old_photos/ --output out/
  python -m disco_jax.inference.colorize --workdir ckpt/t1 --input a.jpg --output out/ --diverse 3
  python -m disco_jax.inference.colorize --variables tiny.msgpack --model '{"d_model": 16}' ...

The image's Lab (and the ab of a hint image) is resized bilinearly to the work size (256, or 512),
the network predicts ab there, the ab is resized back to the original size and joined to the
ORIGINAL L, in bands of rows. So the output has the input's size and lightness, and a large photo
costs about 10 bytes of memory per pixel (`--max-pixels` refuses larger ones).

Model sizes: `--workdir` reads them from the run's config. A `--variables` file holds arrays only,
so its sizes are the released model's (`DISCO()`) unless `--model` gives the DISCO fields that
differ, as inline JSON or a .json file path.

Editing: `--show-anchors` draws each anchor's token cell with its index (raster order of
the token grid); `--hints FILE.json` then sets anchor colours, as a list applied to every image or a
{file name: list} dict, each entry `{"anchor": i, "rgb": [r, g, b]}` or `{"pixel": [x, y], "rgb":
[...]}`; `--hint-image` gives a painted copy of the (single) input whose superpixel-mean colours label
every anchor, as the official demo's editable mode.
"""
import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time
from typing import List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from disco_jax.data import images
from disco_jax.kernels import cpu
from disco_jax.models import disco
from disco_jax.ops import anchors, colour, superpixel

ANCHOR_RANGE = (3, 14)  # the HF demo's clamp
OFFICIAL_SEED = 130  # seed of the official inference script
# The DISCO fields that set array shapes (a weights file must match them).
SIZE_FIELDS = ('spix_width', 'backbone_width', 'refine_width', 'd_model', 'num_layers', 'ffn_dim')
BAND_PIXELS = 1 << 20  # pixels per band of full-resolution composing: ~30 MB of float temporaries


class Colorized(NamedTuple):
  """One image's results."""
  images: List[np.ndarray]  # the alternatives, each (H, W, 3) uint8 at the input's size
  anchor_mask: np.ndarray  # (h, w) float32 on the work-size token grid, > 0 at anchors
  anchor_label: np.ndarray  # (N, h, w) int32: the bins the generator received, per alternative


# ----------------------------------------------------------------------------- images

def _taps(n_in: int, n_out: int):
  """Bilinear taps with half-pixel centres and clamped edges: (lo, hi) int64 and weight t float32,
  each `(n_out,)`."""
  pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, (pos - lo).astype(np.float32)


def resize_bilinear(x: np.ndarray, height: int, width: int, rows: slice = slice(None),
                    convert=None) -> np.ndarray:
  """`(H, W, C)` -> `(height, width, C)[rows]` float32, bilinear with half-pixel centres and clamped
  edges.

  The same sampling as cv2 INTER_LINEAR, which the official demo uses, so no antialiasing on
  downsizing: the network sees what it saw there. `rows` picks a band of output rows, computed
  exactly as in the whole resize. `convert` is a per-pixel conversion `(n, W, C) -> (n, W, C')`
  applied to the input rows the band reads (at most two per output row) before blending: a large
  image is converted only where it is sampled.
  """
  lo, hi, t = (a[rows] for a in _taps(x.shape[0], height))
  read, at = np.unique(np.concatenate([lo, hi]), return_inverse=True)
  src = np.asarray(x[read] if convert is None else convert(x[read]), np.float32)  # (n, W, C')
  lo, hi = at[:len(t)], at[len(t):]
  x = src[lo] * (1 - t)[:, None, None] + src[hi] * t[:, None, None]  # (rows, W, C')
  lo, hi, t = _taps(x.shape[1], width)
  return x[:, lo] * (1 - t)[None, :, None] + x[:, hi] * t[None, :, None]


def _lab(rgb: np.ndarray) -> np.ndarray:
  """uint8 RGB `(..., 3)` -> float32 Lab `(..., 3)`."""
  return colour.rgb_to_lab(rgb.astype(np.float32) / 255.0)


def to_work_size(rgb: np.ndarray, size: int):
  """uint8 RGB `(H, W, 3)` -> work-size gray `(S, S, 1)` and ab_n `(S, S, 2)`.

  Only the rows the resize samples are converted to Lab (see `resize_bilinear`), so a large photo
  costs no full-size float copy.
  """
  return colour.normalise_lab(resize_bilinear(rgb, size, size, convert=_lab))


def band_rows(height: int, width: int):
  """Row slices covering `height` rows of `width` pixels, about BAND_PIXELS pixels each."""
  step = max(1, BAND_PIXELS // width)
  return [slice(r, min(r + step, height)) for r in range(0, height, step)]


def compose(rgb: np.ndarray, ab_n: np.ndarray) -> np.ndarray:
  """uint8 RGB `(H, W, 3)` + work-size normalised ab `(S, S, 2)` -> uint8 RGB `(H, W, 3)` with the
  input's full-resolution L and the ab resized to `(H, W)`, fitted into the sRGB gamut.

  Composed in bands of rows (`band_rows`), one thread per core: every step is per pixel or, for the
  resize, per output row, so each band is computed exactly as in one whole-image pass while the
  float temporaries stay a few times BAND_PIXELS per thread; memory beyond the uint8 output is
  constant and time linear in H x W.
  """
  height, width = rgb.shape[:2]
  out = np.empty(rgb.shape, np.uint8)  # (H, W, 3)

  def band(rows):
    lightness = colour.lightness_uint8(rgb[rows])[..., None]  # (rows, W, 1)
    ab = resize_bilinear(ab_n, height, width, rows) * colour.AB_SCALE  # (rows, W, 2)
    srgb = colour.fitted_lab_to_rgb(np.concatenate([lightness, ab], -1))
    out[rows] = np.rint(srgb * 255.0).astype(np.uint8)

  # numpy releases the GIL inside its array loops, so threads share the cores without copies.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(band, band_rows(height, width)))  # list(): re-raises a band's exception
  return out


# ----------------------------------------------------------------------------- model steps

@functools.lru_cache(maxsize=None)
def _steps(model: disco.DISCO):
  """The two jitted halves for `model` (hashable); jax.jit then compiles once per batch shape."""

  @jax.jit
  def encode(variables, gray, ab, key):
    enc = model.apply(variables, gray, ab, method=disco.DISCO.encode)
    h, w = enc['spix_size'].shape[1:]

    # Every image uses the same key, so its anchors do not depend on its batch or position.
    def locate(feats, sizes):
      if model.random_anchors:
        return anchors.random_anchors(key, 1, h, w, model.num_anchors)[0]
      return anchors.kmeans_anchors(key, feats[None], sizes[None], model.num_anchors)[0]

    mask = jax.vmap(locate)(enc['modeler_out'], enc['spix_size'])  # (B, h, w)
    keep = ('assoc', 'tokens', 'pos', 'spix_ab', 'modeler_logits')
    return {k: enc[k] for k in keep}, mask

  @jax.jit
  def decode(variables, gray, enc, mask, label):
    return model.apply(variables, gray, enc, mask, label, method=disco.DISCO.decode)['ab_pred']

  return encode, decode


def automatic_ab(model: disco.DISCO, variables, gray, key):
  """Automatic colorization at the work size: gray `(B, S, S, 1)` -> ab_n `(B, S, S, 2)`.

  What `colorize_arrays` computes without hints and with one alternative (k-means anchors with
  `key`, the same for every image; the modeler's most likely bins), from `gray` alone: the ab
  input of `encode` only feeds the superpixel colours that hints read. Jittable with a symbolic
  batch size (`inference.export` serializes it).
  """
  encode, decode = _steps(model)
  enc, mask = encode(variables, gray, jnp.zeros((*gray.shape[:3], 2), jnp.float32), key)
  return decode(variables, gray, enc, mask, anchors.mode_labels(enc['modeler_logits']))


def alternative_labels(logits, n: int, key):
  """`(n, B, h, w)` int32 anchor bins from modeler logits `(B, h, w, Q)`: the mode for n = 1, the
  official top-10 rule for n = 3, seeded samples otherwise (an extension)."""
  if n == 1:
    return anchors.mode_labels(logits)[None]
  if n == 3:
    return anchors.diverse_labels(logits, colour.bin_centres())
  return anchors.sampled_labels(key, logits, n)


# ----------------------------------------------------------------------------- hints

def anchor_cells(mask: np.ndarray) -> np.ndarray:
  """`(n, 2)` (row, col) token cells of the anchors in raster order: index i of the hints."""
  return np.argwhere(mask > 0)


def rgb_label(rgb) -> int:
  """The nearest ab bin of an 8-bit RGB colour (its lightness is the photo's, not the hint's)."""
  lab = colour.rgb_to_lab(np.asarray(rgb, np.float64).reshape(1, 3) / 255.0)
  return int(colour.nearest_bin(jnp.asarray(lab[:, 1:] / colour.AB_SCALE))[0])


def hint_anchor(hint: dict, cells: np.ndarray, image_hw, size: int) -> int:
  """The anchor index a hint entry addresses (see the module docstring for the entry format)."""
  if 'anchor' in hint:
    i = int(hint['anchor'])
    if not 0 <= i < len(cells):
      raise ValueError(f'hint {hint}: anchor index must be in 0..{len(cells) - 1} (run with '
                       '--show-anchors to see the indices)')
    return i
  x, y = hint['pixel']
  height, width = image_hw
  if not (0 <= x < width and 0 <= y < height):
    raise ValueError(f'hint {hint}: pixel outside the {width}x{height} image')
  # The pixel's token cell at the work size; the exact cell if it is an anchor, else the nearest.
  cell = np.array([(y + 0.5) * size / height, (x + 0.5) * size / width]) / superpixel.STRIDE
  centres = cells + 0.5  # (n, 2) in token units
  return int(np.argmin(np.sum((centres - cell) ** 2, -1)))


def apply_hints(labels: np.ndarray, mask: np.ndarray, hints: Sequence[dict], image_hw,
                size: int) -> np.ndarray:
  """Anchor bins `(N, h, w)` with the hinted anchors' bins replaced by their colours' nearest bins.

  mask `(h, w)` the anchors; hints as in the module docstring; image_hw the original (H, W), for
  pixel hints. Other anchors keep their labels.
  """
  labels = np.array(labels)
  cells = anchor_cells(mask)
  for hint in hints:
    if 'rgb' not in hint or ('anchor' in hint) == ('pixel' in hint):
      raise ValueError(f'hint {hint}: needs "rgb" and exactly one of "anchor" or "pixel"')
    row, col = cells[hint_anchor(hint, cells, image_hw, size)]
    labels[:, row, col] = rgb_label(hint['rgb'])
  return labels


def draw_anchors(rgb: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
  """The prediction `(H, W, 3)` uint8 with each anchor's token cell outlined and numbered."""
  img = Image.fromarray(rgb)
  draw = ImageDraw.Draw(img)
  height, width = rgb.shape[:2]
  sy, sx = height / size * superpixel.STRIDE, width / size * superpixel.STRIDE
  line = max(1, round(min(height, width) / 256))
  for i, (row, col) in enumerate(anchor_cells(mask)):
    box = [col * sx, row * sy, (col + 1) * sx - 1, (row + 1) * sy - 1]
    draw.rectangle(box, outline=(255, 255, 255), width=line)
    draw.text((box[0] + line + 1, box[1] + line), str(i), fill=(255, 255, 255),
              stroke_width=1, stroke_fill=(0, 0, 0))
  return np.asarray(img)


# ----------------------------------------------------------------------------- core

class Encoded(NamedTuple):
  """A batch up to its anchors: what `decode_arrays` colours, once per set of hints."""
  rgb_list: Sequence[np.ndarray]  # the inputs, (H_i, W_i, 3)
  size: int  # the work size
  gray: jax.Array  # (B, S, S, 1)
  enc: dict  # encode's outputs the generator reads
  mask: np.ndarray  # (B, h, w) float32, > 0 at anchors
  labels: np.ndarray  # (N, B, h, w) int32: each alternative's anchor bins, before hints


def encode_arrays(model: disco.DISCO, variables, rgb_list: Sequence[np.ndarray],
                  size: int = 256, key=None, diverse: int = 1,
                  hint_rgb: Optional[Sequence[Optional[np.ndarray]]] = None) -> Encoded:
  """The part of `colorize_arrays` that hints do not change: superpixels, features, the colour
  modeler, the anchors and the alternatives' bins (arguments as there)."""
  superpixel.check_size(size, size)
  key = jax.random.key(OFFICIAL_SEED) if key is None else key
  prepared = [to_work_size(rgb, size) for rgb in rgb_list]
  gray = jnp.asarray(np.stack([p[0] for p in prepared]))  # (B, S, S, 1)
  ab = np.stack([p[1] for p in prepared])  # (B, S, S, 2)
  painted = [False] * len(rgb_list)
  for i, hint_img in enumerate(hint_rgb or []):
    if hint_img is not None:
      if hint_img.shape != rgb_list[i].shape:
        raise ValueError(f'the hint image is {hint_img.shape[1]}x{hint_img.shape[0]} but the input '
                         f'is {rgb_list[i].shape[1]}x{rgb_list[i].shape[0]}: paint on a same-size copy')
      ab[i], painted[i] = to_work_size(hint_img, size)[1], True
  encode, _ = _steps(model)
  enc, mask = encode(variables, gray, jnp.asarray(ab), key)
  labels = np.array(alternative_labels(enc['modeler_logits'], diverse,
                                       jax.random.fold_in(key, 1)))  # (N, B, h, w)
  if any(painted):
    gt_labels = np.asarray(colour.nearest_bin(enc['spix_ab']))  # (B, h, w)
    for i in np.flatnonzero(painted):
      labels[:, i] = gt_labels[i]
  return Encoded(rgb_list, size, gray, enc, np.asarray(mask), labels)


def decode_arrays(model: disco.DISCO, variables, encoded: Encoded,
                  hints: Optional[Sequence[Sequence[dict]]] = None) -> List[Colorized]:
  """`encoded`'s colorizations with hints[i] applied to image i: the generator and RefineNet only,
  so an edit costs a fraction of a colorization."""
  _, decode = _steps(model)
  rgb_list, mask, labels = encoded.rgb_list, encoded.mask, encoded.labels.copy()
  for i, image_hints in enumerate(hints or []):
    if image_hints:
      labels[:, i] = apply_hints(labels[:, i], mask[i], image_hints, rgb_list[i].shape[:2],
                                 encoded.size)
  preds = [np.asarray(decode(variables, encoded.gray, encoded.enc, jnp.asarray(mask),
                             jnp.asarray(alt))) for alt in labels]  # N x (B, S, S, 2)
  return [Colorized([compose(rgb_list[i], pred[i]) for pred in preds], mask[i], labels[:, i])
          for i in range(len(rgb_list))]


def colorize_arrays(model: disco.DISCO, variables, rgb_list: Sequence[np.ndarray],
                    size: int = 256, key=None, diverse: int = 1,
                    hints: Optional[Sequence[Sequence[dict]]] = None,
                    hint_rgb: Optional[Sequence[Optional[np.ndarray]]] = None) -> List[Colorized]:
  """Colorize one batch of RGB images `(H_i, W_i, 3)`, uint8 or float in [0, 1] (colour inputs are
  used as their L).

  size: work size, a multiple of 16. key: k-means key (default: the official seed 130). diverse:
  alternatives per image. hints[i]: hint entries for image i. hint_rgb[i]: a painted copy of image i
  (same size) whose superpixel-mean ab labels every anchor (the demo's editable mode), or None.
  """
  encoded = encode_arrays(model, variables, rgb_list, size, key, diverse, hint_rgb)
  return decode_arrays(model, variables, encoded, hints)


# ----------------------------------------------------------------------------- CLI

def list_inputs(path: str):
  """[(file, output stem relative to the output folder)]: one file, or a folder walked sorted."""
  if not os.path.isdir(path):  # a file, or a pipe or device that read_rgb names and refuses
    return [(path, os.path.splitext(os.path.basename(path))[0])]
  found = images.list_images(path)
  stems = [os.path.splitext(os.path.relpath(f, path))[0] for f in found]
  # a.jpg and a.png in one folder would both write a.png: keep the extension in such names.
  return [(f, s if stems.count(s) == 1 else s + '_' + f.rsplit('.', 1)[1].lower())
          for f, s in zip(found, stems)]


def local_model(model_config) -> disco.DISCO:
  """`config.model`'s DISCO, its `cpu_kernels` and `matmul_precision` settings resolved for the
  devices this runs on."""
  setting = model_config.get('cpu_kernels', 'auto')
  fields = {k: v for k, v in dict(model_config).items() if k != 'cpu_kernels'}
  devices = jax.local_devices()
  return disco.from_config(fields, cpu.wanted(setting, devices), devices[0].platform)


def model_from_fields(fields: dict) -> disco.DISCO:
  """The released DISCO with the given fields (e.g. `{"d_model": 32}`) changed."""
  # cpu_kernels and matmul_precision are not sizes: they follow the devices this runs on.
  known = {f.name for f in dataclasses.fields(disco.DISCO)} - {'parent', 'name', 'cpu_kernels',
                                                               'matmul_precision'}
  if set(fields) - known:
    raise ValueError(f'unknown DISCO fields {sorted(set(fields) - known)}; known: '
                     f'{sorted(known)}')
  return local_model({f: getattr(disco.DISCO(), f) for f in known} | dict(fields))


def load_weights(path, fields: Optional[dict] = None):
  """(DISCO, variables) from a weights file: a converted `.msgpack`, or an official `.pth`/`.pth.tar`
  (read without torch) or `.npz`. Its sizes are the released model's unless `fields` give the DISCO
  fields that differ; raises ValueError (or OSError) naming the file when its arrays do not fit."""
  from disco_jax.weights import convert  # imported here: keeps this module's imports light
  model = model_from_fields(fields or {})
  variables = convert.import_variables(path, model)
  expected = jax.eval_shape(lambda: disco.init_variables(model, 0))
  shape = lambda t: jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), t)
  if shape(expected) != shape(variables):
    sizes = {f: getattr(model, f) for f in SIZE_FIELDS}
    raise ValueError(f'{path}: its arrays do not fit the model sizes {sizes}; give the sizes it '
                     'was trained with (--model JSON, or model= in the Python API)')
  return model, variables


def load_model(args):
  """(DISCO, variables) from --workdir or --variables [+ --model]; raises ValueError/OSError."""
  if args.workdir:
    from disco_jax.training import trainer  # imported here: pulls in the training stack
    config, variables = trainer.load_trained(args.workdir)
    model = local_model(config.model)
  else:
    fields = {}
    if args.model:
      text = args.model
      if os.path.isfile(text):
        with open(text) as f:
          text = f.read()
      try:
        fields = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f'--model {args.model}: not JSON nor a JSON file ({e})') from e
    model, variables = load_weights(args.variables, fields)
  if args.anchors is not None:
    model = model.clone(num_anchors=args.anchors)
  return model, variables


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m disco_jax.inference.colorize',
                              description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--workdir', help='training run folder (train.py --workdir)')
  src.add_argument('--variables', help='.msgpack of variables (from disco-convert), or an official '
                   '.pth/.pth.tar (read without torch)')
  p.add_argument('--model', help='DISCO fields for --variables as JSON or a .json file '
                 '(default: the released sizes)')
  p.add_argument('--input', required=True, help='an image or a folder (walked, sorted)')
  p.add_argument('--output', required=True, help='output folder for the PNGs')
  p.add_argument('--size', type=int, default=256,
                 help='work size, a multiple of 16: 256 (trained) or 512 (the demo\'s "high")')
  p.add_argument('--anchors', type=int, help=f'anchors per image, {ANCHOR_RANGE[0]}..'
                 f'{ANCHOR_RANGE[1]} (default: the model\'s)')
  p.add_argument('--seed', type=int, default=OFFICIAL_SEED, help='k-means (and sampling) seed')
  p.add_argument('--diverse', type=int, default=1,
                 help='alternatives per image: 3 = official top-10 rule, others sampled')
  p.add_argument('--batch', type=int, default=8, help='images per compiled call')
  p.add_argument('--hints', help='JSON anchor colours (see the module docstring)')
  p.add_argument('--hint-image', help='painted copy of the single input image')
  p.add_argument('--show-anchors', action='store_true', help='also write NAME_anchors.png')
  p.add_argument('--max-pixels', type=int, default=images.MAX_PIXELS,
                 help='refuse larger images (default %(default)s, PIL\'s limit; about 10 bytes of '
                 'memory per pixel)')
  args = p.parse_args(argv)
  if args.size < 16 or args.size % superpixel.STRIDE:
    p.error(f'--size {args.size}: must be a positive multiple of {superpixel.STRIDE} (256 or 512)')
  if args.anchors is not None and not ANCHOR_RANGE[0] <= args.anchors <= ANCHOR_RANGE[1]:
    p.error(f'--anchors {args.anchors}: must be in {ANCHOR_RANGE[0]}..{ANCHOR_RANGE[1]}')
  if args.diverse < 1 or args.batch < 1 or args.max_pixels < 1:
    p.error('--diverse, --batch and --max-pixels must be at least 1')
  if args.model and args.workdir:
    p.error('--model goes with --variables; a --workdir carries its own model sizes')
  if args.hint_image and not os.path.isfile(args.input):
    p.error('--hint-image needs --input to be one image (the one it was painted on)')
  return args


def _read_hints(path):
  with open(path) as f:
    hints = json.load(f)
  if not isinstance(hints, (list, dict)):
    raise ValueError(f'{path}: expected a list of hints or a {{file name: list}} object')
  return hints


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    model, variables = load_model(args)
    hints = _read_hints(args.hints) if args.hints else []
    hint_img = images.read_rgb(args.hint_image, args.max_pixels) if args.hint_image else None
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if not os.path.exists(args.input):
    print(f'error: --input {args.input}: no such file or folder', file=sys.stderr)
    return 2
  inputs = list_inputs(args.input)
  key = jax.random.key(args.seed)
  failed = 0
  for start in range(0, len(inputs), args.batch):
    batch = []
    for path, stem in inputs[start:start + args.batch]:
      try:
        batch.append((path, stem, images.read_rgb(path, args.max_pixels)))
      except images.UnreadableImage as e:
        print(f'error: {e}; skipped', file=sys.stderr)
        failed += 1
    if not batch:
      continue
    per_image = [hints.get(os.path.basename(p), []) if isinstance(hints, dict) else hints
                 for p, _, _ in batch]
    t0 = time.perf_counter()
    try:
      results = colorize_arrays(model, variables, [b[2] for b in batch], args.size, key,
                                args.diverse, per_image, [hint_img] * len(batch))
    except ValueError as e:  # bad hints or hint image: the user's inputs, not a crash
      print(f'error: {batch[0][0]}: {e}', file=sys.stderr)
      failed += len(batch)
      continue
    seconds = (time.perf_counter() - t0) / len(batch)
    # Drop the inputs' pixels before the outputs are encoded: at 100+ megapixels that is the peak.
    batch = [(path, stem, rgb.shape) for path, stem, rgb in batch]
    for (path, stem, shape), res in zip(batch, results):
      outs = {f'{stem}.png': res.images[0]} if len(res.images) == 1 else {
          f'{stem}_c{j}.png': im for j, im in enumerate(res.images)}
      if args.show_anchors:
        outs[f'{stem}_anchors.png'] = draw_anchors(res.images[0], res.anchor_mask, args.size)
      try:
        for name, im in outs.items():
          out = os.path.join(args.output, name)
          os.makedirs(os.path.dirname(out), exist_ok=True)
          Image.fromarray(im).save(out)
      except (OSError, ValueError) as e:
        print(f'error: cannot write {out}: {e}; skipped', file=sys.stderr)
        failed += 1
        continue
      print(f'{path}: {shape[1]}x{shape[0]}, {seconds:.2f} s')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
