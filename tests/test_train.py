"""The trainer end to end on tiny configs and an image folder the tests write."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import disco as disco_configs
from configs import spixnet as spixnet_configs
from disco_jax.data import folder
from disco_jax.evaluation import evaluator
from disco_jax.models import inception, lpips
from disco_jax.training import checkpoint as ckpt_lib
from disco_jax.training import optim, sharding, tasks, trainer, validate
from disco_jax.weights import convert
from disco_jax.weights import inception as inception_weights
from disco_jax.weights import lpips as lpips_weights
from tests.conftest import REPO


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
  """Ten small colour photos (blocks of colour plus noise) and two corrupt files."""
  folder = tmp_path_factory.mktemp('photos')
  rng = np.random.default_rng(0)
  for i in range(10):
    h, w = rng.integers(40, 90, 2)
    img = np.repeat(np.repeat(rng.integers(0, 255, (4, 4, 3)), 24, 0), 24, 1)[:h, :w]
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / (f'p{i}.jpg' if i % 2 else f'p{i}.png'))
  jpeg = (folder / 'p1.jpg').read_bytes()
  (folder / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) // 3])
  (folder / 'notes.png').write_text('not an image')
  return folder


def _tiny(module, folder, data_dir, **overrides):
  config = module.get_config('tiny')
  config.input.update(dataset='folder', folder=str(folder), data_dir=str(data_dir), image_size=32,
                      global_batch_size=4, shuffle_buffer=16, eval_split='train')
  config.optim.num_steps = 2
  config.ckpt.every_steps = 2
  config.eval.update(every_steps=2, max_batches=1)
  config.log.update(every_steps=1, images_every_steps=100, num_images=2)
  for key, value in overrides.items():
    section, field = key.split('.') if '.' in key else (None, key)
    (config[section] if section else config)[field] = value
  return config


@pytest.fixture(scope='module')
def stage1(photo_folder, tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  workdir = root / 'spixnet'
  scalars = trainer.train_and_evaluate(_tiny(spixnet_configs, photo_folder, root / 'tfds'),
                                     str(workdir))
  return root, workdir, scalars


def test_stage1_trains_and_exports_spixnet(stage1):
  _, workdir, scalars = stage1
  assert np.isfinite(scalars['loss']) and 'val_loss' in scalars
  exported = convert.load_variables(workdir / tasks.SPIXNET_EXPORT)
  assert set(exported) == {'params', 'batch_stats'} and 'segnet' in exported['params']


@pytest.fixture(scope='module')
def stage2(stage1, photo_folder):
  """A tiny colorizer trained 2 steps on the 4 devices, from stage 1's SPixNet."""
  root, spix_dir, _ = stage1
  workdir = root / 'disco'
  config = _tiny(disco_configs, photo_folder, root / 'tfds', spixnet_checkpoint=str(spix_dir))
  scalars = trainer.train_and_evaluate(config, str(workdir))
  return workdir, config, scalars


def test_stage2_two_steps_then_resume_on_another_device_count(stage1, stage2):
  _, spix_dir, _ = stage1
  workdir, config, scalars = stage2
  assert {'loss', 'ce_modeler', 'ce_generator', 'grad_norm', 'lr', 'val_loss'} <= set(scalars)
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if 'loss' in l] == [1, 2]
  assert json.loads((workdir / 'config.json').read_text())['spixnet_checkpoint'] == str(spix_dir)
  assert list((workdir / 'samples').glob('*.png')) and list((workdir / 'tensorboard').iterdir())

  # The frozen SPixNet is stage 1's, unchanged by training; the workdir alone restores the model.
  saved_config, variables = trainer.load_trained(str(workdir))
  assert saved_config.model.d_model == config.model.d_model
  exported = convert.load_variables(spix_dir / tasks.SPIXNET_EXPORT)
  np.testing.assert_array_equal(variables['params']['segnet']['conv2a_0']['kernel'],
                                exported['params']['segnet']['conv2a_0']['kernel'])
  assert set(variables) == {'params', 'batch_stats', 'spectral'}
  assert ckpt_lib.Checkpointer(workdir / 'checkpoints').latest_step() == 2

  # A fresh process with one CPU device continues the run the 4 devices wrote: train.py, the
  # config overrides, the restore onto another mesh and the data position all take part.
  args = [sys.executable, 'train.py', '--config', 'configs/disco.py:tiny', '--workdir',
          str(workdir), '--config.optim.num_steps=3', f'--config.spixnet_checkpoint={spix_dir}']
  for key in ('dataset', 'folder', 'data_dir', 'image_size', 'global_batch_size', 'eval_split'):
    args.append(f'--config.input.{key}={config.input[key]}')
  args += ['--config.eval.max_batches=1', '--config.log.images_every_steps=100',
           '--config.log.every_steps=1']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming from the checkpoint at step 2' in out.stderr
  assert 'train step compiled (per device):' in out.stderr and 'GFLOP' in out.stderr
  assert 'over 1 devices' in out.stderr and 'step 3/3' in out.stderr
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if 'loss' in l] == [1, 2, 3]


def test_folder_with_corrupt_files_is_skipped_counted_named(stage1, photo_folder):
  root, _, _ = stage1
  report = folder.prepare_folder(str(photo_folder), str(root / 'tfds'))
  assert report.num_images == 10
  assert sorted(os.path.basename(p) for p, _ in report.skipped) == ['notes.png', 'truncated.jpg']


def test_bad_config_fields_are_named(photo_folder, tmp_path):
  config = _tiny(disco_configs, photo_folder, tmp_path / 'tfds', spixnet_checkpoint='')
  config.input.dataset = 'imagenet21k'
  config.input.global_batch_size = 6
  with pytest.raises(validate.ConfigError) as err:
    validate.validate_config(config)
  msg = str(err.value)
  assert "config.input.dataset='imagenet21k'" in msg
  assert 'config.input.global_batch_size=6: must be a positive multiple of the device count 4' in msg
  assert "config.spixnet_checkpoint=''" in msg


def test_validation_only_looks(photo_folder, tmp_path):
  """validate_config prepares nothing: no TFDS folder dataset, no demo photos, no ImageNet build
  (the trainer prepares them when training starts)."""
  data_dir = tmp_path / 'tfds'
  config = _tiny(spixnet_configs, photo_folder, data_dir)
  validate.validate_config(config)  # a folder of photos: fine, and not prepared
  config.input.dataset = 'demo'
  validate.validate_config(config)
  assert not data_dir.exists()
  config.input.dataset = 'imagenet2012'
  with pytest.raises(validate.ConfigError, match='manual download'):
    validate.validate_config(config)
  manual = data_dir / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  for tar in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'):
    (manual / tar).write_bytes(b'')
  validate.validate_config(config)  # the tars are there: training will prepare it
  assert sorted(p.name for p in data_dir.iterdir()) == ['downloads']


def _spix_setup(photo_folder, root, learning_rate):
  config = _tiny(spixnet_configs, photo_folder, root / 'tfds', **{'optim.learning_rate':
                                                                  learning_rate})
  task = tasks.make_task(config)
  schedule = optim.learning_rate_schedule(config.optim, 1)
  return task, schedule, optim.make_optimizer(config.optim, schedule, task.frozen)


def test_batchnorm_statistics_are_global_4_devices_equal_1(stage1, photo_folder):
  """Same global batch on 1 and 4 devices: with per-device BatchNorm statistics (SPixNet has a BN
  in every block) the losses and running statistics would differ at once.

  Tolerance 1e-5 absolute on losses of ~1: the two runs differ only in reduction order. The
  learning rate is small because Adam's first steps move every parameter by about +-lr whatever
  the gradient's size, so rounding noise in near-zero gradients would otherwise grow to ~5e-4 by
  step 2 (measured at lr 1e-3) and hide what this test is about.
  """
  root, _, _ = stage1
  task, schedule, tx = _spix_setup(photo_folder, root, 1e-5)
  rng = np.random.default_rng(0)
  gray = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)), jnp.float32)
  batch = {'gray': gray, 'ab': jnp.asarray(rng.uniform(-0.4, 0.4, (4, 32, 32, 2)), jnp.float32)}
  runs = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(1, devices)
    state = trainer.create_state(task, tx, 0)
    state_shard = sharding.tree_shardings(mesh, state)
    step = jax.jit(trainer.make_train_step(task, tx, schedule, 0),
                   in_shardings=(state_shard, sharding.batch_sharding(mesh)))
    state = jax.device_put(state, state_shard)
    losses = []
    for _ in range(3):
      state, m = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
      losses.append(float(m['loss']))
    runs.append((losses, jax.device_get(state.model_state)))
  np.testing.assert_allclose(runs[0][0], runs[1][0], atol=1e-5, rtol=0)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         runs[0][1], runs[1][1])


def test_nonfinite_step_is_not_applied_and_named(stage1, photo_folder):
  root, _, _ = stage1
  task, schedule, tx = _spix_setup(photo_folder, root, 1e-3)
  state = trainer.create_state(task, tx, 0)
  gray = jnp.zeros((4, 32, 32, 1))
  ab = jnp.zeros((4, 32, 32, 2)).at[0, 0, 0, 0].set(jnp.nan)
  new, m = jax.jit(trainer.make_train_step(task, tx, schedule, 0))(state, {'gray': gray, 'ab': ab})
  assert not bool(m['finite'])
  np.testing.assert_array_equal(new.params['conv1a_0']['kernel'],
                                state.params['conv1a_0']['kernel'])
  pending = trainer.PendingMetrics([(6, m)])
  with pytest.raises(trainer.NonFiniteLoss, match='non-finite value at step 7: .*spixel'):
    pending.flush()


@pytest.mark.parametrize('max_update_ratio', [0.0, 1.0])
def test_train_step_updates_the_donated_state_in_place(stage1, photo_folder, max_update_ratio):
  """The compiled step copies no parameter or Adam moment of the donated state: such copies live
  through the whole step (0.49 GB at 256x256 batch 2). XLA made them whenever the old state was
  read by something the selection of a skipped step did not depend on."""
  root, _, _ = stage1
  task, schedule, tx = _spix_setup(photo_folder, root, 1e-3)
  state = trainer.create_state(task, tx, 0)
  batch = {'gray': jnp.zeros((4, 32, 32, 1)), 'ab': jnp.zeros((4, 32, 32, 2))}
  step = jax.jit(trainer.make_train_step(task, tx, schedule, 0, max_update_ratio),
                 donate_argnums=(0,))
  hlo = step.lower(state, batch).compile().as_text()
  entry = hlo[hlo.index('\nENTRY'):]
  entry = entry[:entry.index('\n}')]
  arrays = set(re.findall(r'%(\S+) = f32\[\d[\d,]*\]\S* parameter\(', entry))
  assert len(arrays) > 100  # every kernel, bias and moment of the tiny SPixNet
  copied = arrays & set(re.findall(r'copy\(%(\S+?)\)', entry))
  assert not copied, sorted(copied)[:5]


def test_fsdp_shards_large_kernels_and_computes_the_same_step(monkeypatch, stage1, photo_folder):
  # The tiny model has no kernel above the real size threshold: count every kernel as large.
  monkeypatch.setattr(sharding, 'FSDP_RULES', ((r'(^|/)kernel$', 1),))
  root, _, _ = stage1
  task, schedule, tx = _spix_setup(photo_folder, root, 1e-5)
  rng = np.random.default_rng(1)
  batch = {'gray': jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)), jnp.float32),
           'ab': jnp.asarray(rng.uniform(-0.4, 0.4, (4, 32, 32, 2)), jnp.float32)}
  losses = []
  for fsdp in (1, 2):
    mesh = sharding.make_mesh(fsdp)
    state = trainer.create_state(task, tx, 0)
    shard = sharding.tree_shardings(mesh, state)
    if fsdp == 2:
      kernel_spec = shard.params['conv1a_0']['kernel'].spec
      assert kernel_spec == jax.sharding.PartitionSpec(None, None, None, 'fsdp')
      assert shard.params['conv1a_1']['bias'].spec == jax.sharding.PartitionSpec()
      adam_mu = jax.tree_util.tree_leaves(shard.opt_state[0].mu['conv1a_0'])
      assert all(s.spec == kernel_spec for s in adam_mu)
    step = jax.jit(trainer.make_train_step(task, tx, schedule, 0),
                   in_shardings=(shard, sharding.batch_sharding(mesh)), out_shardings=(shard, None))
    new, m = step(jax.device_put(state, shard), jax.device_put(batch, sharding.batch_sharding(mesh)))
    assert new.params['conv1a_0']['kernel'].sharding.spec == shard.params['conv1a_0']['kernel'].spec
    losses.append(float(m['loss']))
  np.testing.assert_allclose(losses[0], losses[1], atol=1e-5, rtol=0)


def test_eval_writes_every_metric_and_the_pngs(stage2, tmp_path):
  workdir, _, _ = stage2
  # Random InceptionV3 weights in our format: FID's path end to end, not its value.
  variables = inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  inception_weights.save_inception(tmp_path / 'inception.msgpack', jax.device_get(variables))
  # And random AlexNet LPIPS weights (tests/test_lpips.py checks LPIPS' value).
  x = jnp.zeros((1, 32, 32, 3))
  lpips_weights.save_lpips(tmp_path / 'lpips.msgpack',
                           jax.device_get(lpips.LPIPS().init(jax.random.key(0), x, x)['params']))
  metrics = evaluator.evaluate_workdir(str(workdir), inception=str(tmp_path / 'inception.msgpack'),
                                       num_images=3, max_batches=2,
                                       lpips=str(tmp_path / 'lpips.msgpack'))
  saved = json.loads((workdir / 'eval' / 'metrics.json').read_text())
  assert saved.keys() == metrics.keys()
  for key in ('psnr', 'ssim', 'colorfulness', 'colorfulness_gt', 'colorfulness_gap', 'fid',
              'lpips'):
    assert isinstance(saved[key], float) and np.isfinite(saved[key]), key
  assert saved['num_images'] == 8 and saved['num_anchors'] == 3 and saved['seed'] == 130
  assert saved['split'] == 'train' and saved['resolution'] == 32
  pngs = sorted((workdir / 'eval' / 'images').glob('*.png'))
  assert len(pngs) == 3 and Image.open(pngs[0]).size == (3 * 32 + 4 * 2, 32 + 2 * 2)  # padded row
  no_fid = evaluator.evaluate_workdir(str(workdir), max_batches=1)
  assert no_fid['fid'].startswith('unavailable') and no_fid['num_images'] == 4
  assert no_fid['lpips'].startswith('unavailable') and lpips_weights.ALEXNET_URL in no_fid['lpips']
  # Weights converted elsewhere (a variables file) with a config, as for official checkpoints.
  config, variables = trainer.load_trained(str(workdir))
  convert.save_variables(tmp_path / 'v.msgpack', jax.device_get(variables))
  imported = evaluator.evaluate(config, convert.load_variables(tmp_path / 'v.msgpack'),
                                str(tmp_path / 'imported'), max_batches=1)
  assert imported['psnr'] == pytest.approx(no_fid['psnr'], rel=1e-6)
  assert (tmp_path / 'imported' / 'metrics.json').exists()
