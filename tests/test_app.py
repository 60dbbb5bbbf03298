"""The anchor-editing web page (python -m disco_jax.app) in a real headless Chromium.

A tiny random model (test_colorize's `tiny` fixture) serves on a free localhost port: through
`python -m disco_jax.app` in a process of its own for the bad-upload case, from a thread of this
process for the edit case. Its colours mean nothing, so the edit case checks the page against the
colorize library: the anchor a click picks is the one under it, and the page's edited result and
full-size download are exactly what `colorize_arrays` gives for that anchor and colour. The
bad-upload cases run without a browser too.
"""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from disco_jax.app import server
from disco_jax.inference import colorize
from disco_jax.ops import colour
from disco_jax.ops import superpixel
from tests.test_colorize import TINY, tiny  # pylint: disable=unused-import  (the fixture)

PAGE_ANCHORS, PAGE_SEED, PAGE_SIZE = 8, 130, 256  # the page's defaults
EDIT_RGB = (230, 20, 40)
# As in test_colorize: 8-bit rounding of an output whose L is exact moves L by at most 0.6.
L_TOL = 0.6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(h, w, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 37.0)], -1) * 200 + 20
  return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _png_bytes(img, **kw):
  buf = io.BytesIO()
  img.save(buf, format=kw.pop('format', 'PNG'), **kw)
  return buf.getvalue()


# ----------------------------------------------------------------------------- bad uploads

# name -> (the file's bytes, words of the message); made when a test asks (100 MP takes ~3 s).
BAD_UPLOADS = {
    'not_an_image.jpg': (lambda: b'this is text, not a photo', 'cannot read the image'),
    'truncated.png': (lambda: _png_bytes(Image.fromarray(_photo(64, 64)))[:2000],
                      'cannot read the image'),
    'one_pixel.png': (lambda: _png_bytes(Image.new('RGB', (1, 1))), 'at least 16 pixels'),
    'strip.png': (lambda: _png_bytes(Image.new('L', (20000, 10))), '20000x10 pixels'),
    # 100 megapixels, over the page's limit: refused from the header, before decoding.
    'huge.png': (lambda: _png_bytes(Image.new('L', (10000, 10000))), 'over the limit of 25.0'),
    'empty.png': (lambda: b'', 'empty'),
}


@pytest.mark.parametrize('name', sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_with_a_message(name):
  make, words = BAD_UPLOADS[name]
  with pytest.raises(server.PageError, match=words) as e:
    server.read_upload(make(), name)
  assert name in str(e.value) and '/tmp' not in str(e.value)


def test_just_over_the_page_limit_is_refused():
  side = int(np.sqrt(server.MAX_PIXELS)) + 1
  data = _png_bytes(Image.new('L', (side, side)))
  with pytest.raises(server.PageError, match='over the limit of 25.0'):
    server.read_upload(data, 'big.png')


def test_cmyk_and_16_bit_photos_are_accepted_as_8_bit_rgb():
  rgb = _photo(40, 60)
  cmyk = server.read_upload(_png_bytes(Image.fromarray(rgb).convert('CMYK'), format='JPEG',
                                       quality=95), 'cmyk.jpg')
  assert cmyk.shape == (40, 60, 3) and cmyk.dtype == np.uint8
  assert np.abs(cmyk.astype(int) - rgb).mean() < 12  # JPEG at quality 95, through CMYK
  wide = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # a 16-bit greyscale PNG
  grey = server.read_upload(_png_bytes(wide), 'grey16.png')
  np.testing.assert_array_equal(grey[..., 0], rgb[..., 0])  # scaled by 257, not clipped


# ----------------------------------------------------------------------------- the browser

@pytest.fixture(scope='module')
def app_url(tiny):
  cmd = [sys.executable, '-m', 'disco_jax.app', '--weights', tiny[2], '--model', json.dumps(TINY),
         '--port', '0']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  line = proc.stdout.readline()
  if not line.startswith('serving on '):
    proc.kill()
    pytest.fail(f'the app did not start: {line}{proc.stdout.read()}')
  yield line.split()[-1].rstrip('/')
  proc.kill()
  proc.wait()


@pytest.fixture(scope='module')
def page_url(tiny):
  """The page served from a thread of this process with the `tiny` fixture's model, so that its
  results and the library's below come from the same compiled executables and compare exactly.
  (Compiled in two processes they need not: CI once saw 5 of 2.1M 8-bit values differ by 1.)"""
  model, variables, _ = tiny
  httpd = server.make_server(server.App(model, variables), 0)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()
  httpd.server_close()
  thread.join()


@pytest.fixture(scope='module')
def browser():
  webdriver = pytest.importorskip('selenium.webdriver', reason='selenium is not installed '
                                  '(pip install -r requirements-ui.txt)')
  chromium, driver = shutil.which('chromium'), shutil.which('chromedriver')
  if not (chromium and driver):
    pytest.skip('chromium and chromedriver are not installed (apt-get install chromium '
                'chromium-driver; .ci/run does it)')
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
              '--window-size=1500,900'):
    options.add_argument(arg)
  b = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
  yield b
  b.quit()


def _wait(browser, condition, what, timeout=150):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  try:
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: condition(b))
  except Exception as e:
    message = browser.find_element('id', 'message').text
    raise AssertionError(f'waited {timeout} s for {what}; the page says: {message!r}') from e


def _version(browser):
  return int(browser.find_element('tag name', 'body').get_attribute('data-version') or 0)


def _upload(browser, path):
  browser.find_element('id', 'file').send_keys(str(path))


def _data_url_image(url):
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(',', 1)[1]))).convert('RGB'))


def test_click_an_anchor_set_its_colour_and_download(browser, page_url, tiny, tmp_path):
  model, variables, _ = tiny
  photo = _photo(800, 1200)  # above the page's preview size, so downloads are recomposed
  Image.fromarray(photo).save(tmp_path / 'photo.png')
  browser.get(page_url + '/')
  _upload(browser, tmp_path / 'photo.png')
  _wait(browser, lambda b: _version(b) == 1, 'the automatic colorization')

  # The anchor under a click: the centre of anchor 1's token cell, in the image's screen pixels.
  cells = np.array(browser.execute_script('return state.cells'))
  pw, ph = browser.execute_script('return state.preview')
  assert len(cells) == PAGE_ANCHORS
  target = 1
  img = browser.find_element('css selector', 'img.result')
  scale = img.size['width'] / pw
  cx = (cells[target][1] + 0.5) * superpixel.STRIDE * pw / PAGE_SIZE * scale
  cy = (cells[target][0] + 0.5) * superpixel.STRIDE * ph / PAGE_SIZE * scale
  # Imported here: without selenium the browser fixture has already skipped this test.
  from selenium.webdriver.common import action_chains  # pylint: disable=g-import-not-at-top
  action_chains.ActionChains(browser).move_to_element_with_offset(
      img, int(cx - img.size['width'] / 2), int(cy - img.size['height'] / 2)).click().perform()
  _wait(browser, lambda b: b.find_element('id', 'selected').get_attribute('data-anchor')
        == str(target), f'anchor {target} to be picked')

  # A colour input has no keyboard entry in Chromium: set it as the picker does, then 'change'.
  browser.execute_script("const c = document.getElementById('colour'); c.value = arguments[0];"
                         "c.dispatchEvent(new Event('change'));", '#%02x%02x%02x' % EDIT_RGB)
  _wait(browser, lambda b: _version(b) == 2, 'the edited colorization')
  shot = os.environ.get('DISCO_APP_SCREENSHOT', str(tmp_path / 'app.png'))
  assert browser.save_screenshot(shot)

  # Nothing but the page's own server was asked for anything (images arrive as data: URLs).
  resources = browser.execute_script(
      "return performance.getEntriesByType('resource').map(e => e.name)")
  assert all(r.startswith(page_url + '/') for r in resources), resources

  preview = server.preview_of(photo)
  k_model = model.clone(num_anchors=PAGE_ANCHORS)
  run = lambda hints: colorize.colorize_arrays(k_model, variables, [preview], PAGE_SIZE,
                                               jax.random.key(PAGE_SEED), 1, [hints])[0]
  auto, edited = run([]), run([{'anchor': target, 'rgb': list(EDIT_RGB)}])
  np.testing.assert_array_equal(colorize.anchor_cells(auto.anchor_mask), cells)
  shown = _data_url_image(browser.find_element('css selector', 'img.result').get_attribute('src'))
  # The same compiled computation (page_url): exact, and PNG is lossless.
  np.testing.assert_array_equal(shown, colorize.draw_anchors(edited.images[0], auto.anchor_mask,
                                                             PAGE_SIZE))
  assert np.abs(edited.images[0].astype(int) - auto.images[0]).max() > 0  # the edit did something

  with urllib.request.urlopen(f'{page_url}/download?id={browser.execute_script("return state.id")}'
                              '&alt=0') as r:
    full = np.asarray(Image.open(io.BytesIO(r.read())).convert('RGB'))
  assert full.shape == photo.shape
  np.testing.assert_array_equal(full, server.full_resolution(photo, edited.images[0]))
  lightness = lambda x: colour.rgb_to_lab(x.astype(np.float64) / 255.0)[..., 0]
  assert np.max(np.abs(lightness(full) - lightness(photo))) <= L_TOL


def test_a_bad_upload_shows_a_message_and_the_next_photo_colorizes(browser, app_url, tmp_path):
  bad = tmp_path / 'holiday.jpg'
  bad.write_bytes(b'not a photo at all')
  good = tmp_path / 'good.png'
  Image.fromarray(_photo(200, 300, seed=3)).save(good)
  browser.get(app_url + '/')
  _upload(browser, bad)
  _wait(browser, lambda b: 'error' in b.find_element('id', 'message').get_attribute('class'),
        'the error message')
  message = browser.find_element('id', 'message').text
  assert 'holiday.jpg' in message and 'cannot read the image' in message, message
  _upload(browser, good)
  _wait(browser, lambda b: _version(b) == 1, 'the colorization after the bad file')
  assert browser.find_element('id', 'message').text.startswith('done in')
  assert len(browser.find_elements('css selector', 'img.result')) == 1


def test_three_alternatives_carry_the_edit_and_download_each(tiny):
  model, variables, _ = tiny
  app = server.App(model, variables)
  photo = _photo(120, 180, seed=5)
  pid = app.upload(_png_bytes(Image.fromarray(photo)), 'p.png')['id']
  hints = [{'anchor': 2, 'rgb': list(EDIT_RGB)}]
  answer = app.colorize({'id': pid, 'anchors': PAGE_ANCHORS, 'size': PAGE_SIZE, 'diverse': True,
                         'hints': hints})
  expected = colorize.colorize_arrays(model.clone(num_anchors=PAGE_ANCHORS), variables, [photo],
                                      PAGE_SIZE, jax.random.key(PAGE_SEED), 3, [hints])[0]
  assert len(answer['results']) == 3
  for j in range(3):
    name, png = app.download(pid, str(j))
    assert name == f'p_colorized{j}.png'
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected.images[j])
  with pytest.raises(server.PageError, match='alt: 3 must be in 0..2'):
    app.download(pid, '3')
  with pytest.raises(server.PageError, match='anchors: 15 must be in 3..14'):
    app.colorize({'id': pid, 'anchors': 15})
  with pytest.raises(server.PageError, match='anchor indices must be in 0..7'):
    app.colorize({'id': pid, 'anchors': PAGE_ANCHORS, 'hints': [{'anchor': 8, 'rgb': [0] * 3}]})


def test_an_edit_decodes_the_held_encoding_and_new_settings_encode_again(tiny, monkeypatch):
  model, variables, _ = tiny
  app = server.App(model, variables)
  photo = _photo(96, 128, seed=7)
  pid = app.upload(_png_bytes(Image.fromarray(photo)), 'p.png')['id']
  app.colorize({'id': pid, 'anchors': 4, 'size': PAGE_SIZE})
  encodes = []
  real = colorize.encode_arrays
  monkeypatch.setattr(colorize, 'encode_arrays', lambda *a, **k: encodes.append(a) or real(*a, **k))
  hints = [{'anchor': 1, 'rgb': list(EDIT_RGB)}]
  app.colorize({'id': pid, 'anchors': 4, 'size': PAGE_SIZE, 'hints': hints})
  assert not encodes  # hints alone: the held encoding
  _, png = app.download(pid, '0')
  expected = colorize.colorize_arrays(model.clone(num_anchors=4), variables, [photo], PAGE_SIZE,
                                      jax.random.key(PAGE_SEED), 1, [hints])[0]
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected.images[0])
  encodes.clear()
  app.colorize({'id': pid, 'anchors': 4, 'size': PAGE_SIZE, 'seed': 3, 'hints': hints})
  assert len(encodes) == 1  # a new seed: new anchors, encoded again
