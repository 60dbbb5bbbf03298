"""Colorize photos of any size with a trained DISCO model (the official demo's recipe).

  python -m disco_jax.inference.colorize --variables disco.msgpack --input old_photos/ --output out/
  python -m disco_jax.inference.colorize --workdir ckpt/t1 --input a.jpg --output out/ --diverse 3
  python -m disco_jax.inference.colorize --variables tiny.msgpack --model '{"d_model": 16}' ...

The image's full-resolution Lab is computed first; L (and the ab of a hint image) is resized
bilinearly to the work size (256, or 512), the network predicts ab there, the ab is resized back to
the original size and joined to the ORIGINAL L. So the output has the input's size and lightness.

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


class Colorized(NamedTuple):
  """One image's results."""
  images: List[np.ndarray]  # the alternatives, each (H, W, 3) uint8 at the input's size
  anchor_mask: np.ndarray  # (h, w) float32 on the work-size token grid, > 0 at anchors
  anchor_label: np.ndarray  # (N, h, w) int32: the bins the generator received, per alternative


# ----------------------------------------------------------------------------- images

def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """`(H, W, C)` -> `(height, width, C)` float32, bilinear with half-pixel centres and clamped edges.

  The same sampling as cv2 INTER_LINEAR, which the official demo uses, so no antialiasing on
  downsizing: the network sees what it saw there.
  """
  def taps(n_in, n_out):
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)

  x = np.asarray(x, np.float32)
  lo, hi, t = taps(x.shape[0], height)
  x = x[lo] * (1 - t)[:, None, None] + x[hi] * t[:, None, None]  # (height, W, C)
  lo, hi, t = taps(x.shape[1], width)
  return x[:, lo] * (1 - t)[None, :, None] + x[:, hi] * t[None, :, None]


def to_work_size(rgb: np.ndarray, size: int):
  """uint8 RGB `(H, W, 3)` -> full-res L `(H, W)`, work-size gray `(S, S, 1)` and ab_n `(S, S, 2)`."""
  lab = colour.rgb_to_lab(rgb.astype(np.float32) / 255.0)  # (H, W, 3)
  gray, ab = colour.normalise_lab(resize_bilinear(lab, size, size))
  return lab[..., 0], gray, ab


def compose(lightness: np.ndarray, ab_n: np.ndarray) -> np.ndarray:
  """Full-res L `(H, W)` + work-size normalised ab `(S, S, 2)` -> uint8 RGB `(H, W, 3)`."""
  ab = resize_bilinear(ab_n, *lightness.shape) * colour.AB_SCALE
  lab = colour.fit_gamut(np.concatenate([lightness[..., None], ab], -1))
  return np.rint(colour.lab_to_rgb(lab) * 255.0).astype(np.uint8)


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

def colorize_arrays(model: disco.DISCO, variables, rgb_list: Sequence[np.ndarray],
                    size: int = 256, key=None, diverse: int = 1,
                    hints: Optional[Sequence[Sequence[dict]]] = None,
                    hint_rgb: Optional[Sequence[Optional[np.ndarray]]] = None) -> List[Colorized]:
  """Colorize one batch of uint8 RGB images `(H_i, W_i, 3)` (colour inputs are used as their L).

  size: work size, a multiple of 16. key: k-means key (default: the official seed 130). diverse:
  alternatives per image. hints[i]: hint entries for image i. hint_rgb[i]: a painted copy of image i
  (same size) whose superpixel-mean ab labels every anchor (the demo's editable mode), or None.
  """
  superpixel.check_size(size, size)
  key = jax.random.key(OFFICIAL_SEED) if key is None else key
  n = len(rgb_list)
  prepared = [to_work_size(rgb, size) for rgb in rgb_list]
  gray = jnp.asarray(np.stack([p[1] for p in prepared]))  # (B, S, S, 1)
  ab = np.stack([p[2] for p in prepared])  # (B, S, S, 2)
  painted = [False] * n
  for i, hint_img in enumerate(hint_rgb or []):
    if hint_img is not None:
      if hint_img.shape != rgb_list[i].shape:
        raise ValueError(f'the hint image is {hint_img.shape[1]}x{hint_img.shape[0]} but the input '
                         f'is {rgb_list[i].shape[1]}x{rgb_list[i].shape[0]}: paint on a same-size copy')
      ab[i], painted[i] = to_work_size(hint_img, size)[2], True
  encode, decode = _steps(model)
  enc, mask = encode(variables, gray, jnp.asarray(ab), key)
  labels = np.array(alternative_labels(enc['modeler_logits'], diverse,
                                       jax.random.fold_in(key, 1)))  # (N, B, h, w)
  gt_labels = np.asarray(colour.nearest_bin(enc['spix_ab']))  # (B, h, w)
  mask = np.asarray(mask)
  for i in range(n):
    if painted[i]:
      labels[:, i] = gt_labels[i]
    if hints and hints[i]:
      labels[:, i] = apply_hints(labels[:, i], mask[i], hints[i], rgb_list[i].shape[:2], size)
  preds = [np.asarray(decode(variables, gray, enc, jnp.asarray(mask), jnp.asarray(alt)))
           for alt in labels]  # N x (B, S, S, 2)
  return [Colorized([compose(prepared[i][0], pred[i]) for pred in preds], mask[i], labels[:, i])
          for i in range(n)]


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


def load_model(args):
  """(DISCO, variables) from --workdir or --variables [+ --model]; raises ValueError/OSError."""
  if args.workdir:
    from disco_jax.training import trainer  # imported here: pulls in the training stack
    config, variables = trainer.load_trained(args.workdir)
    model = disco.from_config(config.model, cpu.wanted(config.model.get('cpu_kernels', 'auto'),
                                                        jax.local_devices()))
  else:
    from disco_jax.weights import convert
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
    # cpu_kernels is not a size: it follows the devices this runs on.
    known = {f.name for f in dataclasses.fields(disco.DISCO)} - {'parent', 'name', 'cpu_kernels'}
    if set(fields) - known:
      raise ValueError(f'--model: unknown fields {sorted(set(fields) - known)}; known: '
                       f'{sorted(known)}')
    model = disco.from_config({f: getattr(disco.DISCO(), f) for f in known} | fields,
                              cpu.wanted('auto', jax.local_devices()))
    variables = convert.load_variables(args.variables)
    expected = jax.eval_shape(lambda: disco.init_variables(model, 0))
    shape = lambda t: jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), t)
    if shape(expected) != shape(variables):
      sizes = {f: getattr(model, f) for f in sorted(known)}
      raise ValueError(f'{args.variables}: its arrays do not fit the model sizes {sizes}; pass '
                       'the sizes it was trained with as --model JSON')
  if args.anchors is not None:
    model = model.clone(num_anchors=args.anchors)
  return model, variables


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m disco_jax.inference.colorize',
                              description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--workdir', help='training run folder (train.py --workdir)')
  src.add_argument('--variables', help='.msgpack of variables (from python -m disco_jax.weights.convert)')
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
  args = p.parse_args(argv)
  if args.size < 16 or args.size % superpixel.STRIDE:
    p.error(f'--size {args.size}: must be a positive multiple of {superpixel.STRIDE} (256 or 512)')
  if args.anchors is not None and not ANCHOR_RANGE[0] <= args.anchors <= ANCHOR_RANGE[1]:
    p.error(f'--anchors {args.anchors}: must be in {ANCHOR_RANGE[0]}..{ANCHOR_RANGE[1]}')
  if args.diverse < 1 or args.batch < 1:
    p.error('--diverse and --batch must be at least 1')
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
    hint_img = images.read_rgb(args.hint_image) if args.hint_image else None
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
        batch.append((path, stem, images.read_rgb(path)))
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
    for (path, stem, rgb), res in zip(batch, results):
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
      print(f'{path}: {rgb.shape[1]}x{rgb.shape[0]}, {seconds:.2f} s')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
