"""`from disco_jax import Colorizer`: every input kind, size and lightness kept, compiled once per
work size, loaded from a converted .msgpack or an official-format .pth.

(Loading from a training workdir is tested in test_init_from_and_eval.py, which trains one.) A
tiny random model at work size 64 keeps this fast; what is tested is the recipe, not the colours.
"""
import contextlib
import time

import jax
import numpy as np
import pytest
from PIL import Image

from disco_jax import Colorizer
from disco_jax.models import disco
from disco_jax.ops import colour
from disco_jax.weights import convert
from tests import torch_writer
from tests.conftest import make_state_dict

TINY = dict(spix_width=4, backbone_width=8, refine_width=8, d_model=16, num_layers=2, num_heads=2,
            ffn_dim=32, num_anchors=3)
SIZE = 64
# One 8-bit step moves sRGB lightness by at most ~0.56 L, and rounding is half a step per channel:
# 0.6 L bounds the error of an output whose L is exact (as in test_colorize.py).
L_TOL = 0.6
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@pytest.fixture(scope='module')
def colorizer(tmp_path_factory):
  path = tmp_path_factory.mktemp('model') / 'tiny.msgpack'
  convert.save_variables(str(path), disco.init_variables(disco.DISCO(**TINY), 0))
  return Colorizer.load(path, model=TINY)


def _photo(h, w, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 7.0)], -1) * 200 + 20
  return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _lightness(rgb):
  unit = rgb / 255.0 if rgb.dtype == np.uint8 else rgb
  return colour.rgb_to_lab(np.broadcast_to(unit.astype(np.float64), rgb.shape[:2] + (3,)))[..., 0]


@contextlib.contextmanager
def _count_compiles():
  count = []
  listener = lambda event, duration, **kw: count.append(event) if event == COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _inputs(tmp_path):
  rgb = _photo(90, 120)
  grey = rgb[..., 0]
  Image.fromarray(rgb).save(tmp_path / 'p.png')
  return {
      'path': (str(tmp_path / 'p.png'), rgb),
      'pathlib': (tmp_path / 'p.png', rgb),
      'pil': (Image.fromarray(rgb), rgb),
      'pil_grey': (Image.fromarray(grey), np.repeat(grey[..., None], 3, -1)),
      'uint8_hw': (grey, np.repeat(grey[..., None], 3, -1)),
      'uint8_hw1': (grey[..., None], np.repeat(grey[..., None], 3, -1)),
      'uint8_hw3': (rgb, rgb),
      'float_hw3': (rgb / 255.0, rgb / 255.0),
      'float32_hw': ((grey / 255.0).astype(np.float32), np.repeat(grey[..., None], 3, -1) / 255.0),
  }


def test_every_input_kind_keeps_size_and_lightness(colorizer, tmp_path):
  for kind, (image, reference) in _inputs(tmp_path).items():
    out = colorizer(image, size=SIZE)
    assert out.shape == reference.shape and out.dtype == np.uint8, kind
    assert np.max(np.abs(_lightness(out) - _lightness(reference))) <= L_TOL, kind


def test_alternatives_hints_and_bad_inputs(colorizer):
  rgb = _photo(64, 80)
  alternatives = colorizer(rgb, size=SIZE, diverse=3)
  assert isinstance(alternatives, list) and len(alternatives) == 3
  assert all(a.shape == rgb.shape for a in alternatives)
  red = colorizer(rgb, size=SIZE, hints=[{'anchor': 0, 'rgb': [255, 0, 0]}])
  assert red.shape == rgb.shape and not np.array_equal(red, colorizer(rgb, size=SIZE))
  for bad, message in [(np.zeros((8, 8, 4), np.uint8), r'\(H, W\), \(H, W, 1\) or \(H, W, 3\)'),
                       (np.full((8, 8), 1.5), r'expected \[0, 1\]'),
                       (np.zeros((8, 8), np.int32), 'expected uint8')]:
    with pytest.raises(ValueError, match=message):
      colorizer(bad, size=SIZE)
  with pytest.raises(ValueError, match='anchors=2'):
    colorizer(rgb, anchors=2, size=SIZE)


def test_second_call_compiles_nothing(colorizer):
  rgb = _photo(100, 150, seed=3)
  with _count_compiles() as first:
    t0 = time.perf_counter()
    colorizer(rgb, anchors=5, size=SIZE)
    t1 = time.perf_counter()
  with _count_compiles() as second:
    out = colorizer(rgb, anchors=5, size=SIZE, seed=7)
    t2 = time.perf_counter()
  assert first, 'the first call at a new anchor count and size compiles'
  assert not second, f'the second call compiled {len(second)} times'
  print(f'first call {t1 - t0:.2f} s, second {t2 - t1:.2f} s')
  # A new anchor count is a new model: its own compilation, and the first one's cache stays.
  with _count_compiles() as other_anchors:
    colorizer(rgb, anchors=6, size=SIZE)
  with _count_compiles() as back:
    again = colorizer(rgb, anchors=5, size=SIZE, seed=7)
  assert other_anchors and not back
  np.testing.assert_array_equal(again, out)


def test_load_refuses_misfitting_and_missing_files(colorizer, tmp_path):
  path = tmp_path / 'tiny.msgpack'
  convert.save_variables(str(path), disco.init_variables(disco.DISCO(**TINY), 0))
  with pytest.raises(ValueError, match='do not fit the model sizes'):
    Colorizer.load(path, model=dict(TINY, d_model=32))
  with pytest.raises(FileNotFoundError, match='no such file or workdir'):
    Colorizer.load(tmp_path / 'absent.pth')


def test_load_official_pth_without_torch(parity, tmp_path):
  """The released model's state dict (the parity fixtures' deterministic weights), written in
  torch's zip format here: Colorizer.load converts it as the converter does, bit for bit."""
  state_dict = make_state_dict(parity, 3)
  path = torch_writer.save_state_dict(tmp_path / 'disco-beta.pth.tar', state_dict)
  loaded = Colorizer.load(path)
  # The released sizes; cpu_kernels follows the devices (on here: tests run on CPUs).
  assert loaded.model == disco.DISCO(cpu_kernels=True)
  expected = convert.variables_from_state_dict(state_dict)
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  got, want = flat(loaded.variables), flat(expected)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
