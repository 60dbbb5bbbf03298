"""Hostile and odd image files through the image-folder dataset and the colorize command.

The corpus and what must happen to each file are the table in tools/hostile_corpus.py. One
campaign (module fixture) runs it through `prepare_folder` plus a tf.data train epoch and eval pass,
and through `python -m disco_jax.inference.colorize` with a tiny random model; each test asserts one class.
"""
import os
import re
import stat

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from disco_jax.data import folder as folder_lib
from disco_jax.inference import colorize
from tools import hostile_corpus as hc

REQUIRED = (  # the kinds of file the corpus must hold, by their names in the table
    'empty.jpg', 'empty.png', 'trunc_jpeg_2.jpg', 'trunc_jpeg_half.jpg', 'trunc_jpeg_minus1.jpg',
    'trunc_png_8.png', 'trunc_png_half.png', 'text.jpg', 'random.png', 'pdf.jpg', 'zip.jpg',
    'cmyk.jpg', 'grey16.png', 'rgb16.png', 'rgba.png', 'palette.png', 'palette.gif', 'grey.jpg',
    'la.png', 'bilevel.png', 'one_pixel.png', 'two_by_two.png', 'wide_20000x10.png',
    'tall_10x20000.jpg', 'exif6.jpg', 'exif3.jpg', 'bomb.png', 'bomb.jpg', 'café photo ünï.jpg',
    os.path.join('dir.jpg', 'inside.png'), 'missing_link.jpg', 'photo.webp', 'photo.bmp',
    'photo.tiff', 'animated.gif', 'jpeg_named.png', 'UPPER.JPG', 'bad_crc_ihdr.png',
    'bad_crc_idat.png', 'pipe.jpg', 'marker_in_scan.jpg')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(corpus folder, tfds data dir, colorize output dir, campaign result, {name: detail})."""
  root = str(tmp_path_factory.mktemp('hostile'))
  result = hc.campaign(root)
  folder = os.path.join(root, 'corpus')
  by_name = {os.path.relpath(d['path'], folder): d for d in result['details']}
  return folder, os.path.join(root, 'tfds'), os.path.join(root, 'out'), result, by_name


def _names(by_name, expected):
  return sorted(n for n, d in by_name.items() if d['expected'] == expected)


def test_corpus_holds_every_required_kind_and_grows_deterministically(tmp_path):
  written = hc.write_corpus(str(tmp_path / 'a'))
  names = [os.path.relpath(p, tmp_path / 'a') for p, _ in written]
  assert len(written) >= 40 and not set(REQUIRED) - set(names)
  assert {e for _, e in written} == {hc.OK, hc.BAD}
  table = {c.name: c for c, _ in hc.corpus_cases()}
  assert sorted(table) == sorted(names)
  assert all(c.reason for c in table.values() if c.expected == hc.BAD)
  assert all(c.size for c in table.values() if c.expected == hc.OK)
  a = tmp_path / 'a'
  assert (a / 'empty.png').stat().st_size == 0 and (a / 'dir.jpg').is_dir()
  assert stat.S_ISFIFO(os.lstat(a / 'pipe.jpg').st_mode)
  assert os.path.islink(a / 'missing_link.jpg') and not os.path.exists(a / 'missing_link.jpg')
  assert (a / 'bomb.png').stat().st_size < 1_000_000  # claims 30 GB of pixels
  # More files than the table: seeded variants, the same bytes every time.
  n = len(written) + 8
  grown = [hc.write_corpus(str(tmp_path / d), count=n) for d in ('c', 'd')]
  assert [os.path.basename(p) for p, _ in grown[0]] == [os.path.basename(p) for p, _ in grown[1]]
  assert len(grown[0]) == n and {e for _, e in grown[0][-8:]} == {hc.OK, hc.BAD}
  for (p, _), (q, _) in zip(grown[0][-8:], grown[1][-8:]):
    assert open(p, 'rb').read() == open(q, 'rb').read()
  with pytest.raises(ValueError, match='base corpus'):
    hc.write_corpus(str(tmp_path / 'e'), count=3)
  with pytest.raises(FileExistsError, match='not empty'):
    hc.write_corpus(str(a))


def test_campaign_no_crash_every_file_as_expected(run):
  _, _, _, result, by_name = run
  problems = {n: d['problems'] for n, d in by_name.items() if d['problems']}
  assert not problems and not result['run_crashes']
  assert result['crashes'] == 0 and result['wrong'] == 0
  assert result['files_tried'] == len(by_name)
  assert result['colorized'] == len(_names(by_name, hc.OK))
  assert result['rejected_with_clear_error'] == len(_names(by_name, hc.BAD))
  assert result['exit_status'] == 1  # some files were skipped, and the command says so


def test_folder_report_names_exactly_the_bad_files_with_reasons(run):
  folder, data_dir, _, _, by_name = run
  report = folder_lib.prepare_folder(folder, data_dir)  # prepared by the campaign: reused here
  skipped = {os.path.relpath(p, folder): r for p, r in report.skipped}
  assert sorted(skipped) == _names(by_name, hc.BAD)
  assert report.num_images == len(_names(by_name, hc.OK))
  cases = {c.name: c for c, _ in hc.corpus_cases()}
  for name, reason in skipped.items():
    assert re.search(cases[name].reason, reason, re.IGNORECASE), (name, reason)
  assert re.search(r'100000x100000 is 10000\.0 megapixels, over the limit of 179\.0',
                   skipped['bomb.png'])  # refused from the header, not a MemoryError


def test_colorize_names_each_bad_file_on_its_own_error_line(run):
  _, _, out, _, by_name = run
  for name in _names(by_name, hc.BAD):
    line = by_name[name]['colorize_detail']
    # The one photo reader's message, as the folder dataset logs it: the file, then why.
    assert line.startswith(f'error: {by_name[name]["path"]}: ') and line.endswith('; skipped'), line
  written = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out)
                   for f in fs)
  assert len(written) == len(_names(by_name, hc.OK))  # nothing written for a bad file


def test_exif_rotation_in_dataset_and_colorized_output(run):
  folder, _, out, _, by_name = run
  stems = dict(colorize.list_inputs(folder))
  for name, (w, h), corner in (('exif6.jpg', (32, 48), 'tr'), ('exif3.jpg', (48, 32), 'br'),
                               ('exif8.jpg', (32, 48), 'bl')):
    assert by_name[name]['folder'] == 'kept' and not by_name[name]['problems']
    with Image.open(os.path.join(out, stems[os.path.join(folder, name)] + '.png')) as img:
      rgb = np.asarray(img.convert('RGB'))
    assert rgb.shape == (h, w, 3)
    corners = hc.corner_means(hc.lightness(rgb))
    # The block is 230 grey on a photo at a quarter of its brightness: tens of L apart.
    assert corners[corner] > max(v for k, v in corners.items() if k != corner) + 20, corners


def test_sixteen_bit_grey_is_scaled_not_clipped(run):
  folder, _, out, _, _ = run
  stems = dict(colorize.list_inputs(folder))
  with Image.open(os.path.join(out, stems[os.path.join(folder, 'grey16.png')] + '.png')) as img:
    rgb = np.asarray(img.convert('RGB'))
  # The file's 16-bit values x * 1300 (x = column), written by the table, as 8 bits.
  grey8 = np.rint(np.mgrid[:20, :50][1] * 1300 / 257.0).astype(np.uint8)
  want = hc.lightness(np.repeat(grey8[..., None], 3, -1))
  assert np.abs(hc.lightness(rgb) - want).max() <= hc.L_TOL  # clipping would give L = 100


def test_odd_modes_and_sizes_are_kept_and_colorized_at_their_lightness(run):
  _, _, _, _, by_name = run
  for name in ('cmyk.jpg', 'rgb16.png', 'rgba.png', 'palette.png', 'palette_transparent.png',
               'palette.gif', 'animated.gif', 'grey.jpg', 'la.png', 'bilevel.png', 'bilevel.tif',
               'one_pixel.png', 'one_pixel.jpg', 'two_by_two.png', 'wide_20000x10.png',
               'tall_10x20000.jpg', 'photo.webp', 'photo.bmp', 'photo.tiff',
               'café photo ünï.jpg', os.path.join('dir.jpg', 'inside.png'), 'UPPER.JPG',
               'jpeg_named.png', 'png_no_iend.png', 'bad_crc_idat.png'):
    d = by_name[name]
    # campaign checked: stored shape and pixels, output shape, output L within L_TOL
    assert (d['folder'], d['colorize'], d['problems']) == ('kept', 'colorized', []), (name, d)


def test_jpeg_tf_cannot_decode_is_stored_as_pixels_so_tf_data_reads_it(run):
  folder = run[0]
  odd = os.path.join(folder, 'marker_in_scan.jpg')
  with open(odd, 'rb') as f:
    encoded = f.read()
  # The case still tests something: TF refuses the bytes that PIL reads.
  with pytest.raises(tf.errors.InvalidArgumentError):
    tf.io.decode_image(encoded, channels=3, expand_animations=False)
  stored = folder_lib.stored_image(odd)
  assert isinstance(stored, np.ndarray) and stored.shape == (64, 96, 3)
  plain = folder_lib.stored_image(os.path.join(folder, 'exif1.jpg'))
  assert isinstance(plain, bytes)  # an ordinary JPEG still keeps its own bytes


def test_classify_counts_crashes_and_disagreements():
  ok = hc.Case('a.png', hc.OK, 'photo', size=(4, 4))
  bad = hc.Case('b.jpg', hc.BAD, 'empty', reason=r'cannot identify')
  cases = [('/a.png', ok), ('/b.jpg', bad)]
  good = ({'/a.png': ('kept', ''), '/b.jpg': ('skipped', 'cannot identify image file')},
          {'/a.png': ('colorized', ''), '/b.jpg': ('rejected', 'error: cannot identify')})
  counts, _ = hc.classify(cases, *good)
  assert (counts['colorized'], counts['rejected_with_clear_error'], counts['wrong'],
          counts['crashes']) == (1, 1, 0, 0)
  unclear = ({'/a.png': ('skipped', 'OSError'), '/b.jpg': ('skipped', 'KeyError: 3')}, good[1])
  counts, details = hc.classify(cases, *unclear)
  assert counts['wrong'] == 2 and counts['crashes'] == 0 and all(d['problems'] for d in details)
  crashed = (good[0], {'/a.png': ('crash', 'boom'), '/b.jpg': ('rejected', 'cannot identify')})
  counts, _ = hc.classify(cases, *crashed)
  assert counts['crashes'] == 1 and counts['wrong'] == 1 and counts['colorized'] == 0
