"""colorize.py: size and lightness kept, EXIF, folders with bad files, diversity, anchor hints.

A tiny random model at work size 64 keeps this fast; what is tested is the recipe, not the colours.
"""
import json
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image
import skimage.data

from disco_jax.data import images
from disco_jax.inference import colorize
from disco_jax.models import disco
from disco_jax.ops import colour
from disco_jax.weights import convert

TINY = dict(spix_width=4, backbone_width=8, refine_width=8, d_model=16, num_layers=2, num_heads=2,
            ffn_dim=32, num_anchors=3)
SIZE = 64
# One 8-bit step moves sRGB lightness by at most ~0.56 L (steepest near rgb = 10/255), and
# rounding is half a step per channel: 0.6 L bounds the error of an output whose L is exact.
L_TOL = 0.6


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  m = disco.DISCO(**TINY)
  variables = disco.init_variables(m, 0)
  path = tmp_path_factory.mktemp('model') / 'tiny.msgpack'
  convert.save_variables(str(path), variables)
  return m, variables, str(path)


def _photo(h, w, seed=0, grey=False):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 7.0)], -1) * 200 + 20
  img = np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
  return np.repeat(img[..., :1], 3, -1) if grey else img


def _lightness(rgb):
  return colour.rgb_to_lab(rgb.astype(np.float64) / 255.0)[..., 0]


def _cli(tiny, *args):
  return colorize.main(['--variables', tiny[2], '--model', json.dumps(TINY), '--size', str(SIZE),
                        *args])


def test_size_and_lightness_kept_for_colour_and_grey(tiny):
  m, variables, _ = tiny
  inputs = [_photo(200, 300), _photo(200, 300, seed=1, grey=True)]
  results = colorize.colorize_arrays(m, variables, inputs, SIZE)
  for rgb, res in zip(inputs, results):
    (out,) = res.images
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.max(np.abs(_lightness(out) - _lightness(rgb))) <= L_TOL


def test_fit_gamut_keeps_lightness():
  lab = np.array([[95.0, 100.0, 100.0], [10.0, -100.0, 90.0], [50.0, 5.0, 5.0]], np.float32)
  fitted = colour.fit_gamut(lab)
  np.testing.assert_allclose(fitted[:, 0], lab[:, 0])
  np.testing.assert_allclose(fitted[2], lab[2])  # in gamut: unchanged
  back = colour.rgb_to_lab(colour.lab_to_rgb(fitted))
  np.testing.assert_allclose(back, fitted, atol=0.05)


def test_exif_orientation_and_folder_with_bad_file(tiny, tmp_path, capsys):
  src, out = tmp_path / 'in', tmp_path / 'out'
  src.mkdir()
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display": a 300x200 file shows as 200x300
  Image.fromarray(_photo(200, 300)).save(src / 'a_rotated.jpg', exif=exif)
  Image.fromarray(_photo(120, 80, grey=True)[..., 0]).save(src / 'b_grey.png')
  (src / 'c_bad.jpg').write_bytes(b'not a jpeg at all')
  Image.fromarray(_photo(64, 96)).save(src / 'd.webp')
  (src / 'notes.txt').write_text('not an image, not touched')
  code = _cli(tiny, '--input', str(src), '--output', str(out), '--batch', '2')
  assert code == 1
  assert 'c_bad.jpg' in capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == ['a_rotated.png', 'b_grey.png', 'd.png']
  assert Image.open(out / 'a_rotated.png').size == (200, 300)  # (W, H): transposed
  assert Image.open(out / 'b_grey.png').size == (80, 120)


def test_bad_anchor_count_is_a_usage_error(tiny, tmp_path):
  with pytest.raises(SystemExit) as e:
    _cli(tiny, '--input', str(tmp_path), '--output', str(tmp_path), '--anchors', '20')
  assert e.value.code == 2


def test_diverse_three_gives_distinct_outputs(tiny, tmp_path):
  path = tmp_path / 'p.png'
  Image.fromarray(_photo(96, 80)).save(path)
  assert _cli(tiny, '--input', str(path), '--output', str(tmp_path / 'o'), '--diverse', '3',
              '--show-anchors') == 0
  outs = [np.asarray(Image.open(tmp_path / 'o' / f'p_c{j}.png')) for j in range(3)]
  assert (tmp_path / 'o' / 'p_anchors.png').exists()
  for i in range(3):
    for j in range(i):
      assert not np.array_equal(outs[i], outs[j])


def test_hint_sets_exactly_one_anchor_label(tiny):
  m, variables, _ = tiny
  rgb = _photo(128, 160)
  (plain,) = colorize.colorize_arrays(m, variables, [rgb], SIZE)
  hints = [{'anchor': 1, 'rgb': [255, 0, 0]}]
  (edited,) = colorize.colorize_arrays(m, variables, [rgb], SIZE, hints=[hints])
  np.testing.assert_array_equal(edited.anchor_mask, plain.anchor_mask)  # same locations
  cells = colorize.anchor_cells(plain.anchor_mask)
  assert len(cells) == TINY['num_anchors']
  red_ab = colour.rgb_to_lab(np.array([1.0, 0.0, 0.0]))[1:] / colour.AB_SCALE
  red = int(colour.nearest_bin(red_ab))
  for i, (row, col) in enumerate(cells):
    want = red if i == 1 else plain.anchor_label[0, row, col]
    assert edited.anchor_label[0, row, col] == want
  # A pixel hint inside anchor 1's cell (work size 64 -> cells of 16 px, i.e. 40x32 px here).
  row, col = cells[1]
  pixel = [int((col + 0.5) * 16 * 160 / SIZE), int((row + 0.5) * 16 * 128 / SIZE)]
  (by_pixel,) = colorize.colorize_arrays(m, variables, [rgb], SIZE,
                                         hints=[[{'pixel': pixel, 'rgb': [255, 0, 0]}]])
  np.testing.assert_array_equal(by_pixel.anchor_label, edited.anchor_label)


def test_hint_image_labels_anchors_with_painted_colours(tiny):
  m, variables, _ = tiny
  rgb = _photo(64, 64, grey=True)
  painted = np.zeros_like(rgb)
  painted[...] = (0, 160, 0)  # everything painted green
  (res,) = colorize.colorize_arrays(m, variables, [rgb], SIZE, hint_rgb=[painted])
  green_ab = colour.rgb_to_lab(np.array([0.0, 160 / 255, 0.0]))[1:] / colour.AB_SCALE
  labels = res.anchor_label[0][res.anchor_mask > 0]
  assert np.all(labels == int(colour.nearest_bin(green_ab)))


def _whole_image_compose(rgb, ab_n):
  """compose as one whole-image pass (the code before banding): the reference of the banded one."""
  lightness = colour.rgb_to_lab(rgb.astype(np.float32) / 255.0)[..., :1]
  ab = colorize.resize_bilinear(ab_n, *rgb.shape[:2]) * colour.AB_SCALE
  lab = colour.fit_gamut(np.concatenate([lightness, ab], -1))
  return np.rint(colour.lab_to_rgb(lab) * 255.0).astype(np.uint8)


@pytest.mark.parametrize('name', ['astronaut', 'coffee'])
def test_banded_compose_is_bit_identical_to_a_whole_image_pass(name, monkeypatch):
  rgb = getattr(skimage.data, name)()
  lab = colour.rgb_to_lab(rgb.astype(np.float32) / 255.0)
  gray, ab = colour.normalise_lab(colorize.resize_bilinear(lab, SIZE, SIZE))
  got_gray, got_ab = colorize.to_work_size(rgb, SIZE)  # converts only the sampled rows
  np.testing.assert_array_equal(got_gray, gray)
  np.testing.assert_array_equal(got_ab, ab)
  # Twice the photo's chroma plus noise: many colours leave the gamut and are fitted.
  ab_n = (2 * ab + np.random.default_rng(0).normal(0, 0.2, ab.shape)).astype(np.float32)
  monkeypatch.setattr(colorize, 'BAND_PIXELS', 7919)  # a prime: bands of a few rows, a short last
  # Every step is per pixel or per output row, so the bands must give the very same bytes.
  np.testing.assert_array_equal(colorize.compose(rgb, ab_n), _whole_image_compose(rgb, ab_n))


def test_lightness_uint8_is_rgb_to_lab_to_the_bit():
  levels = np.arange(0, 256, 5, dtype=np.uint8)  # a 52^3 lattice of the RGB cube, plus all greys
  cube = np.stack(np.meshgrid(levels, levels, levels, indexing='ij'), -1).reshape(-1, 3)
  rgb = np.concatenate([cube, np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)])
  for shaped in (rgb, rgb[:140800].reshape(275, 512, 3)):  # as listed, and as rows of a photo
    want = colour.rgb_to_lab(shaped.astype(np.float32) / 255.0)[..., 0]
    np.testing.assert_array_equal(colour.lightness_uint8(shaped), want)


def test_compose_memory_is_the_output_plus_a_few_bands(monkeypatch):
  rgb = _photo(1000, 1500)  # 4.5 MB of output; a whole-image pass holds ~25 float copies of it
  ab_n = np.random.default_rng(0).normal(0, 0.3, (SIZE, SIZE, 2)).astype(np.float32)
  monkeypatch.setattr(colorize, 'BAND_PIXELS', 1 << 14)
  tracemalloc.start()  # numpy reports its buffers to tracemalloc
  try:
    out = colorize.compose(rgb, ab_n)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  # Per thread a band's float temporaries: ~20 arrays of 16384 x 3 float32, 4 MB in all.
  assert peak <= out.nbytes + (os.cpu_count() or 1) * 4e6, (peak, out.nbytes)


def test_images_over_max_pixels_are_refused_from_the_header(tiny, tmp_path, capsys):
  path = tmp_path / 'big.png'
  Image.fromarray(_photo(100, 120)).save(path)
  with pytest.raises(images.UnreadableImage, match=r'big.png: 120x100 is 0.0 megapixels, over the '
                     r'limit of 0.0 \(max_pixels'):
    images.read_rgb(str(path), max_pixels=11_999)
  assert images.read_rgb(str(path), max_pixels=12_000).shape == (100, 120, 3)
  assert _cli(tiny, '--input', str(path), '--output', str(tmp_path / 'o'),
              '--max-pixels', '11999') == 1
  assert '--max-pixels' in capsys.readouterr().err
  assert not (tmp_path / 'o').exists()
