"""Fine-tuning (`config.init_from`), a workdir for Colorizer.load, and eval.py on a real run:
config overrides, `--folder`, and a folder of stage runs named by its subfolder."""
import json
import logging
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import disco as disco_configs
from disco_jax import Colorizer
from disco_jax.models import disco
from disco_jax.training import trainer
from disco_jax.weights import convert, torch_file
from tests.conftest import REPO


def _photos(folder, n, seed):
  folder.mkdir()
  rng = np.random.default_rng(seed)
  for i in range(n):
    img = np.repeat(np.repeat(rng.integers(0, 255, (4, 4, 3)), 12, 0), 12, 1)
    Image.fromarray(img.astype(np.uint8)).save(folder / f'p{i}.png')
  return folder


def _config(root, init_from, **model):
  config = disco_configs.get_config('tiny')
  config.model.update(model)
  config.init_from = str(init_from)
  config.input.update(dataset='folder', folder=str(root / 'photos'), data_dir=str(root / 'tfds'),
                      image_size=32, global_batch_size=4, shuffle_buffer=8, eval_split='train')
  config.optim.num_steps = 2
  config.ckpt.every_steps = 2
  config.eval.update(every_steps=2, max_batches=1)
  config.log.update(every_steps=1, images_every_steps=100, num_images=2)
  return config


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
      jax.device_get(tree))}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  _photos(root / 'photos', 8, seed=0)
  model = disco.DISCO(**{k: disco_configs.get_config('tiny').model[k] for k in (
      'spix_width', 'backbone_width', 'refine_width', 'd_model', 'num_layers', 'num_heads',
      'ffn_dim')})
  convert.save_variables(str(root / 'released.msgpack'), disco.init_variables(model, 5))
  return root


@pytest.fixture(scope='module')
def trained(root):
  """Two steps of a run started from released.msgpack, in root/stages/disco."""
  workdir = root / 'stages' / 'disco'
  scalars = trainer.train_and_evaluate(_config(root, root / 'released.msgpack'), str(workdir))
  return workdir, scalars


def test_a_new_run_starts_from_the_imported_weights(root, caplog):
  caplog.set_level(logging.INFO)
  run = trainer.set_up(_config(root, root / 'released.msgpack'), str(root / 'step0'))
  imported = convert.load_variables(root / 'released.msgpack')
  assert int(run.state.step) == 0 and run.start == 0
  assert _flat(run.state.params).keys() == _flat(imported['params']).keys()
  for name, got in [('params', run.state.params)] + list(run.state.model_state.items()):
    want = _flat(imported[name])
    for key, value in _flat(got).items():
      np.testing.assert_array_equal(value, want[key], err_msg=f'{name}{key}')
  assert all(not np.any(x) for x in jax.tree_util.tree_leaves(run.state.opt_state)
             if np.ndim(x) > 0), 'the optimizer state is fresh: zero moments'
  assert 'a new run from the weights of config.init_from=' in caplog.text


def test_two_steps_train_and_a_resume_ignores_init_from(root, trained, caplog):
  workdir, scalars = trained
  assert np.isfinite(scalars['loss'])
  _, variables = trainer.load_trained(str(workdir))
  imported = convert.load_variables(root / 'released.msgpack')
  np.testing.assert_array_equal(variables['params']['segnet']['conv0a_0']['kernel'],
                                imported['params']['segnet']['conv0a_0']['kernel'])  # frozen
  moved = variables['params']['wildpath']['layers_0']['linear1']['kernel']
  assert not np.allclose(moved, imported['params']['wildpath']['layers_0']['linear1']['kernel'])
  caplog.set_level(logging.INFO)
  run = trainer.set_up(_config(root, root / 'released.msgpack'), str(workdir))
  assert run.start == 2
  assert 'ignored: this run continues from its own checkpoint at step 2' in caplog.text


def test_spixelnet_pth_fills_the_frozen_spixnet(root, parity):
  path = parity / 'torch' / 'spixnet_seed3.pth.tar'
  run = trainer.set_up(_config(root, path, spix_width=16), str(root / 'from_pth'))
  want = convert.variables_from_state_dict(torch_file.read_state_dict(path), spixnet_only=True)
  for key, value in _flat(run.state.params['segnet']).items():
    np.testing.assert_array_equal(value, _flat(want['params']['segnet'])[key], err_msg=key)


def test_init_from_that_does_not_fit_is_named(root, tmp_path):
  convert.save_variables(str(tmp_path / 'wide.msgpack'),
                         disco.init_variables(disco.DISCO(**{**dict(
                             spix_width=4, backbone_width=8, refine_width=8, d_model=32,
                             num_layers=2, num_heads=2, ffn_dim=32)}), 0))
  with pytest.raises(ValueError, match=r'config.init_from=.*wide.msgpack: its weights do not fit'):
    trainer.set_up(_config(root, tmp_path / 'wide.msgpack'), str(tmp_path / 'run'))


def test_colorizer_loads_a_workdir(trained):
  workdir, _ = trained
  colorizer = Colorizer.load(workdir)
  _, variables = trainer.load_trained(str(workdir))
  assert _flat(colorizer.variables).keys() == _flat(variables).keys()
  out = colorizer(np.full((40, 50), 0.5), size=32, anchors=3)
  assert out.shape == (40, 50, 3) and out.dtype == np.uint8


def _eval(*args):
  return subprocess.run([sys.executable, 'eval.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def test_eval_overrides_and_folder(root, trained, tmp_path):
  workdir, _ = trained
  photos = _photos(tmp_path / 'other', 5, seed=1)
  out = _eval(f'--workdir={workdir}', '--folder', str(photos), '--out', str(tmp_path / 'ev'),
              '--config.input.global_batch_size=2', '--max_batches=2', '--num_images=1')
  assert out.returncode == 0, out.stderr[-3000:]
  metrics = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
  assert metrics['dataset'] == 'folder' and metrics['folder'] == str(photos)
  assert metrics['num_images'] == 4 and metrics['step'] == 2  # 2 batches of the overridden 2
  assert len(list((tmp_path / 'ev' / 'images').glob('*.png'))) == 1


def test_eval_names_the_stage_subfolder(root, trained):
  out = _eval(f'--workdir={root / "stages"}')
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert f'pass --workdir {root / "stages" / "disco"} (the colorizer, stage 2)' in out.stderr
  typo = _eval(f'--workdir={trained[0]}', '--config.input.no_such_field=1')
  assert typo.returncode != 0 and 'no_such_field' in typo.stderr
