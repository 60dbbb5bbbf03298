"""The local web page: photos in, colorizations with editable anchors out, over stdlib HTTP.

Every request is answered with JSON (or a PNG for downloads); a bad upload or a bad request gets a
message the page shows, and the server goes on serving. Nothing leaves the machine: the page is one
HTML file with inline script and style, served from here.

Endpoints (all but the page are POST with a JSON body, or a raw file body for /upload):
  GET  /                      the page
  POST /upload?name=F         the photo's bytes -> {id, width, height, grey}
  POST /colorize              {id, anchors, seed, size, diverse, hints} -> {results, cells, ...}
  POST /pick                  {id, x, y} -> {anchor, rgb}: the anchor a click on the result picks
  GET  /download?id=I&alt=J   alternative J at the photo's full resolution (PNG), its L kept
"""
import base64
import collections
import http.server
import io
import json
import os
import tempfile
import threading
import time
import urllib.parse
import uuid
from typing import NamedTuple

import jax
import numpy as np
from PIL import Image

from disco_jax.data import images
from disco_jax.inference import colorize
from disco_jax.ops import colour, superpixel

PAGE = os.path.join(os.path.dirname(__file__), 'page.html')
WORK_SIZES = (256, 512)
MAX_ALTERNATIVES = 3  # the page's "3 alternatives": the official top-10 rule
MIN_SIDE = 16  # one superpixel cell: a smaller side leaves the token grid without content
# The full-resolution download holds the photo as float32 Lab plus its resized ab: measured 1.4 GB
# and 14 s at 12 MP on the 2-core CPU (bench/NOTES.md), so 25 MP stays near 3 GB.
MAX_PIXELS = 25_000_000
MAX_UPLOAD_BYTES = 200 * 2 ** 20
PREVIEW_SIDE = 1024  # edits run on a copy this large at most; downloads go back to full size
KEEP_PHOTOS = 4  # photos held in memory, oldest forgotten first


class PageError(ValueError):
  """A request the page should explain to the user (bad file, bad field); answered with 400."""


class Photo(NamedTuple):
  name: str
  full: np.ndarray  # (H, W, 3) uint8, as uploaded (upright)
  preview: np.ndarray  # (h, w, 3) uint8, at most PREVIEW_SIDE a side: what is colorized


def read_upload(data: bytes, name: str) -> np.ndarray:
  """Uploaded bytes -> `(H, W, 3)` uint8 RGB through the one photo reader; raises PageError."""
  if not data:
    raise PageError(f'{name}: the file is empty')
  # read_photo takes a path (it looks at it to refuse pipes and devices): the bytes go to disk.
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, os.path.basename(name) or 'upload')
    with open(path, 'wb') as f:
      f.write(data)
    try:
      # The page's limit, checked from the header before anything is decoded.
      rgb = images.read_rgb(path, max_pixels=MAX_PIXELS)
    except images.UnreadableImage as e:
      raise PageError(str(e).replace(path, name)) from e
  height, width = rgb.shape[:2]
  if min(height, width) < MIN_SIDE:
    raise PageError(f'{name}: {width}x{height} pixels; each side needs at least {MIN_SIDE} '
                    'pixels (one superpixel cell)')
  return rgb


def preview_of(rgb: np.ndarray) -> np.ndarray:
  """`(H, W, 3)` -> the copy the page colorizes: unchanged up to PREVIEW_SIDE, else downscaled."""
  height, width = rgb.shape[:2]
  scale = PREVIEW_SIDE / max(height, width)
  if scale >= 1:
    return rgb
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return np.asarray(Image.fromarray(rgb).resize(size, Image.LANCZOS))


def png_data_url(rgb: np.ndarray) -> str:
  buf = io.BytesIO()
  # Every edit re-sends its result: level 1 is faster than the default and the size matters less.
  Image.fromarray(rgb).save(buf, format='PNG', compress_level=1)
  return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')


def full_resolution(full: np.ndarray, result: np.ndarray) -> np.ndarray:
  """The photo `(H, W, 3)` with the ab of a preview's colorization `(h, w, 3)`, its L kept."""
  if full.shape == result.shape:
    return result
  ab_n = colour.rgb_to_lab(result.astype(np.float32) / 255.0)[..., 1:] / colour.AB_SCALE
  return colorize.compose(full, ab_n)


def _int_field(request, key, default, low, high):
  try:
    value = int(request.get(key, default))
  except (TypeError, ValueError) as e:
    raise PageError(f'{key}: {request.get(key)!r} is not a whole number') from e
  if not low <= value <= high:
    raise PageError(f'{key}: {value} must be in {low}..{high}')
  return value


def parse_hints(raw):
  """The page's [{anchor, rgb}] -> colorize hint entries; raises PageError on a malformed one."""
  if not isinstance(raw, list):
    raise PageError('hints: expected a list of {"anchor": i, "rgb": [r, g, b]}')
  hints = []
  for h in raw:
    try:
      rgb = [int(c) for c in h['rgb']]
      hints.append({'anchor': int(h['anchor']), 'rgb': rgb})
    except (KeyError, TypeError, ValueError) as e:
      raise PageError(f'hint {h!r}: needs "anchor" (a number) and "rgb" (three numbers)') from e
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
      raise PageError(f'hint {h!r}: "rgb" must be three numbers in 0..255')
  return hints


class App:
  """The model, the photos uploaded, and the last result of each; one colorization at a time."""

  def __init__(self, model, variables):
    self.model, self.variables = model, variables
    self.photos = collections.OrderedDict()  # id -> Photo
    self.results = {}  # id -> (settings, Colorized) of the last colorization
    # id -> (settings, colorize.Encoded): an edit that changes only hints decodes this again.
    self.encoded = {}
    self.lock = threading.Lock()  # the CPU has no room for two forward passes at once

  def upload(self, data: bytes, name: str) -> dict:
    full = read_upload(data, name)
    photo = Photo(name, full, preview_of(full))
    pid = uuid.uuid4().hex
    with self.lock:
      self.photos[pid] = photo
      while len(self.photos) > KEEP_PHOTOS:
        old, _ = self.photos.popitem(last=False)
        self.results.pop(old, None)
        self.encoded.pop(old, None)
    grey = np.repeat(np.rint(colour.rgb_to_lab(photo.preview.astype(np.float32) / 255.0)[
        ..., :1] * 2.55).astype(np.uint8), 3, -1)  # L 0..100 shown as 0..255
    return {'id': pid, 'name': name, 'width': full.shape[1], 'height': full.shape[0],
            'preview': [photo.preview.shape[1], photo.preview.shape[0]],
            'grey': png_data_url(grey)}

  def _photo(self, request) -> Photo:
    photo = self.photos.get(request.get('id'))
    if photo is None:
      raise PageError('that photo is no longer held by the server: upload it again')
    return photo

  def colorize(self, request: dict) -> dict:
    photo = self._photo(request)
    low, high = colorize.ANCHOR_RANGE
    k = _int_field(request, 'anchors', self.model.num_anchors, low, high)
    seed = _int_field(request, 'seed', colorize.OFFICIAL_SEED, 0, 2 ** 31 - 1)
    size = _int_field(request, 'size', WORK_SIZES[0], min(WORK_SIZES), max(WORK_SIZES))
    if size not in WORK_SIZES:
      raise PageError(f'size: {size} must be one of {WORK_SIZES}')
    diverse = MAX_ALTERNATIVES if request.get('diverse') else 1
    hints = parse_hints(request.get('hints', []))
    if any(not 0 <= h['anchor'] < k for h in hints):
      raise PageError(f'hints: anchor indices must be in 0..{k - 1}')
    settings = (k, seed, size, diverse)
    t0 = time.perf_counter()
    with self.lock:
      # clone() gives an equal (hashable) model per anchor count: its compiled steps are reused.
      model = self.model.clone(num_anchors=k)
      held = self.encoded.get(request['id'])
      if held is None or held[0] != settings:
        held = settings, colorize.encode_arrays(model, self.variables, [photo.preview], size,
                                                jax.random.key(seed), diverse)
        self.encoded[request['id']] = held
      res = colorize.decode_arrays(model, self.variables, held[1], [hints])[0]
      self.results[request['id']] = (settings, res)
    seconds = time.perf_counter() - t0
    cells = colorize.anchor_cells(res.anchor_mask)
    return {'results': [png_data_url(colorize.draw_anchors(im, res.anchor_mask, size))
                        for im in res.images],
            'cells': cells.tolist(), 'size': size, 'seconds': round(seconds, 3)}

  @staticmethod
  def _cell_colour(rgb, cell, size):
    """The mean colour of an anchor's token cell in a result `(h, w, 3)`: the picker's start."""
    height, width = rgb.shape[:2]
    stride = superpixel.STRIDE
    y0, y1 = (np.array([cell[0], cell[0] + 1]) * stride * height / size).astype(int)
    x0, x1 = (np.array([cell[1], cell[1] + 1]) * stride * width / size).astype(int)
    block = rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    return np.rint(block.reshape(-1, 3).mean(0)).astype(int)

  def pick(self, request: dict) -> dict:
    photo = self._photo(request)
    if request['id'] not in self.results:
      raise PageError('colorize the photo before picking an anchor')
    (_, _, size, _), res = self.results[request['id']]
    try:
      x, y = float(request['x']), float(request['y'])
    except (KeyError, TypeError, ValueError) as e:
      raise PageError('pick: needs the click\'s "x" and "y" in preview pixels') from e
    cells = colorize.anchor_cells(res.anchor_mask)
    try:
      i = colorize.hint_anchor({'pixel': [x, y]}, cells, photo.preview.shape[:2], size)
    except ValueError as e:
      raise PageError(str(e)) from e
    return {'anchor': i, 'rgb': self._cell_colour(res.images[0], cells[i], size).tolist()}

  def download(self, pid: str, alt: str):
    """(file name, PNG bytes) of the last result's alternative `alt` at full resolution."""
    photo = self._photo({'id': pid})
    if pid not in self.results:
      raise PageError('nothing colorized yet for that photo')
    res = self.results[pid][1]
    alt = _int_field({'alt': alt}, 'alt', 0, 0, len(res.images) - 1)
    buf = io.BytesIO()
    Image.fromarray(full_resolution(photo.full, res.images[alt])).save(buf, format='PNG')
    stem = os.path.splitext(os.path.basename(photo.name))[0] or 'photo'
    return f'{stem}_colorized{alt if len(res.images) > 1 else ""}.png', buf.getvalue()


def make_handler(app: App):
  """A BaseHTTPRequestHandler class bound to `app`."""

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = 'disco-app'

    def log_message(self, fmt, *args):  # on stdout, without the client's address and the date
      print(fmt % args, flush=True)

    def _send(self, code, body: bytes, kind: str, extra=()):
      self.send_response(code)
      self.send_header('Content-Type', kind)
      self.send_header('Content-Length', str(len(body)))
      self.send_header('Cache-Control', 'no-store')
      for k, v in extra:
        self.send_header(k, v)
      self.end_headers()
      self.wfile.write(body)

    def _json(self, code, obj):
      self._send(code, json.dumps(obj).encode(), 'application/json')

    def _answer(self, work, send=None):
      """Run `work()` and send its JSON (or `send` its result), or the error the page shows; never
      let one escape."""
      try:
        result = work()
        if send:
          send(result)
        else:
          self._json(200, result)
      except PageError as e:
        self._json(400, {'error': str(e)})
      except Exception as e:  # pylint: disable=broad-except
        # A bug or an exhausted machine: say so on the page and keep serving the next request.
        print(f'error: {type(e).__name__}: {e}', flush=True)
        self._json(500, {'error': f'internal error ({type(e).__name__}: {e})'})

    def _body(self) -> bytes:
      length = int(self.headers.get('Content-Length') or 0)
      if length > MAX_UPLOAD_BYTES:
        raise PageError(f'the file is {length / 2 ** 20:.0f} MiB; the page takes at most '
                        f'{MAX_UPLOAD_BYTES // 2 ** 20} MiB')
      return self.rfile.read(length)

    def _request(self) -> dict:
      try:
        obj = json.loads(self._body() or b'{}')
      except json.JSONDecodeError as e:
        raise PageError(f'the request is not JSON ({e})') from e
      if not isinstance(obj, dict):
        raise PageError('the request must be a JSON object')
      return obj

    def do_GET(self):
      url = urllib.parse.urlsplit(self.path)
      if url.path == '/':
        with open(PAGE, 'rb') as f:
          self._send(200, f.read(), 'text/html; charset=utf-8')
      elif url.path == '/download':
        query = urllib.parse.parse_qs(url.query)
        send = lambda named: self._send(200, named[1], 'image/png', [
            ('Content-Disposition', f'attachment; filename="{named[0]}"')])
        self._answer(lambda: app.download(query.get('id', [''])[0], query.get('alt', ['0'])[0]),
                     send)
      else:
        self._json(404, {'error': f'{url.path}: no such page'})

    def do_POST(self):
      url = urllib.parse.urlsplit(self.path)
      if url.path == '/upload':
        name = urllib.parse.parse_qs(url.query).get('name', ['upload'])[0]
        # An over-long body is refused unread: close the connection rather than drain it.
        self.close_connection = True
        self._answer(lambda: app.upload(self._body(), name))
      elif url.path == '/colorize':
        self._answer(lambda: app.colorize(self._request()))
      elif url.path == '/pick':
        self._answer(lambda: app.pick(self._request()))
      else:
        self._json(404, {'error': f'{url.path}: no such endpoint'})

  return Handler


def make_server(app: App, port: int, host: str = '127.0.0.1') -> http.server.ThreadingHTTPServer:
  """The page's HTTP server, listening on `port` (0: a free one), not yet serving."""
  return http.server.ThreadingHTTPServer((host, port), make_handler(app))


def serve(app: App, port: int, host: str = '127.0.0.1'):
  """Serve until interrupted; prints the address once it is listening."""
  server = make_server(app, port, host)
  print(f'serving on http://{host}:{server.server_address[1]}/', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
