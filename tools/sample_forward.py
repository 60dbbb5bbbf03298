"""Run DISCO once on an embedded sample photo and report what it computed.

  python tools/sample_forward.py                        # fresh (untrained) weights
  python tools/sample_forward.py --variables disco.msgpack --out sample.png

Uses scikit-image's astronaut photo (shipped in its wheel, no network). Without `--variables` the
weights are a fresh initialisation, so the colours are meaningless: the run shows that the whole
model (k-means anchors included) compiles and runs, with its shapes, anchors and timings. With
variables converted from an official checkpoint (`python -m disco_jax.weights.convert`) it colorizes.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from PIL import Image
import skimage.data

from disco_jax.models import disco
from disco_jax.ops import colour
from disco_jax.weights import convert


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variables', help='variables file from python -m disco_jax.weights.convert')
  parser.add_argument('--size', type=int, default=256, help='working size (multiple of 16)')
  parser.add_argument('--anchors', type=int, default=8, help='number of colour anchors')
  parser.add_argument('--seed', type=int, default=130, help='k-means seed (official default 130)')
  parser.add_argument('--out', default='sample_forward.png', help='gray | ours | truth PNG')
  args = parser.parse_args()

  rgb = jnp.asarray(skimage.data.astronaut(), jnp.float32) / 255.0
  rgb = jax.image.resize(rgb, (args.size, args.size, 3), 'bilinear')[None]  # (1, S, S, 3)
  gray, ab = colour.normalise_lab(colour.rgb_to_lab(rgb))
  model = disco.DISCO(num_anchors=args.anchors)
  t0 = time.perf_counter()
  if args.variables:
    variables = convert.load_variables(args.variables)
    source = args.variables
  else:
    variables = disco.init_variables(model, 0)
    source = 'fresh initialisation (untrained: colours are meaningless)'
  print(f'weights: {source}; {disco.count_params(variables["params"]):,} parameters '
        f'({time.perf_counter() - t0:.1f} s)')

  colorize = jax.jit(lambda v, g, a, key: model.apply(
      v, g, a, test_mode=True, colours='mode', rngs={'anchors': key}))
  key = jax.random.key(args.seed)
  t0 = time.perf_counter()
  out = jax.block_until_ready(colorize(variables, gray, ab, key))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(colorize(variables, gray, ab, key))
    times.append(time.perf_counter() - t0)

  for name in ('assoc', 'features', 'tokens', 'modeler_logits', 'generator_out', 'diffused',
               'ab_pred'):
    print(f'  {name:16s} {str(tuple(out[name].shape)):22s} range [{float(out[name].min()):+.3f}, '
          f'{float(out[name].max()):+.3f}]')
  rows, cols = np.nonzero(np.asarray(out['anchor_mask'][0]))
  labels = np.asarray(out['anchor_label'][0])[rows, cols]
  print(f'anchors ({len(rows)}), token (row, col) -> ab colour of the modeler\'s most likely bin:')
  for r, c, q in zip(rows, cols, labels):
    a, b = colour.bin_centres()[q]
    print(f'  ({r:2d}, {c:2d}) -> bin {q:3d} (a={a:+.0f}, b={b:+.0f})')
  print(f'first call (compile + run) {compile_s:.1f} s; then {np.median(times):.2f} s per image '
        f'(median of {len(times)}) at {args.size}x{args.size}')

  pred = colour.lab_to_rgb(colour.denormalise_lab(gray, out['ab_pred']))
  gray_rgb = colour.lab_to_rgb(colour.denormalise_lab(gray, jnp.zeros_like(ab)))
  strip = np.concatenate([gray_rgb[0], pred[0], rgb[0]], axis=1)
  Image.fromarray((np.clip(np.asarray(strip), 0, 1) * 255).astype(np.uint8)).save(args.out)
  print(f'wrote {args.out} (gray | ours | ground truth)')


if __name__ == '__main__':
  main()
