"""Edit-to-result time of the web page's colorize request (python -m disco_jax.app).

  python bench/app_edit.py [--size 256] [--side 256] [--edits 5]

The released model's sizes with random weights (the time does not depend on their values), a
photo of `--side` pixels a side; the first request compiles and encodes, then each edit recolours
one anchor and is timed through `App.colorize` (the generator and RefineNet on the held encoding,
composing, drawing the anchors, PNG encoding), which is what the page waits for apart from the
localhost round trip. A request with new settings (a new seed: new anchors) is timed once. The
process's CPU time is printed too: on a machine others load, it says what the edit costs where
wall time cannot.
"""
import argparse
import io
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from disco_jax.app import server  # pylint: disable=wrong-import-position
from disco_jax.models import disco  # pylint: disable=wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', type=int, default=256, help='work size')
  p.add_argument('--side', type=int, default=256, help='photo side in pixels')
  p.add_argument('--edits', type=int, default=5)
  args = p.parse_args()
  model = disco.DISCO()
  app = server.App(model, disco.init_variables(model, 0))
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (args.side, args.side, 3), np.uint8)).save(buf, 'PNG')
  pid = app.upload(buf.getvalue(), 'noise.png')['id']
  t0 = time.perf_counter()
  app.colorize({'id': pid, 'size': args.size})
  print(f'first request (compiles): {time.perf_counter() - t0:.1f} s')
  t0 = time.perf_counter()
  app.colorize({'id': pid, 'size': args.size, 'seed': 1})  # new anchors: encode and decode again
  print(f'new settings (no compiling): {time.perf_counter() - t0:.2f} s')
  times, cpu = [], []
  for i in range(args.edits):
    hints = [{'anchor': i % model.num_anchors, 'rgb': [255, 40 * i % 256, 0]}]
    t0, c0 = time.perf_counter(), time.process_time()
    app.colorize({'id': pid, 'size': args.size, 'seed': 1, 'hints': hints})
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  print(f'edit to result: median {statistics.median(times):.2f} s (min {min(times):.2f}, max '
        f'{max(times):.2f}) over {args.edits} edits; CPU time {statistics.median(cpu):.2f} s '
        f'(min {min(cpu):.2f}) per edit')


if __name__ == '__main__':
  main()
