"""Evaluate a training run the way colorization papers report results.

`evaluate_workdir` restores a checkpoint with the config saved in the workdir, colorizes the
config's evaluation split automatically (k-means anchors on the modeler's features, its most
likely colours: the official inference), and reports PSNR and SSIM on RGB at the evaluation
resolution, colorfulness and its gap to the ground truth, FID when InceptionV3 weights are given
and LPIPS (AlexNet, v0.1) when its converted weights are. The last partial batch is padded and
masked, never dropped.
"""
import io
import json
import logging
import math
import os

from etils import epath
import jax
import numpy as np
from PIL import Image

from disco_jax.data import pipeline
from disco_jax.evaluation import metrics
from disco_jax.models import disco
from disco_jax.models import inception as inception_net
from disco_jax.models import lpips as lpips_net
from disco_jax.ops import colour
from disco_jax.training import sharding, tasks, trainer, writers
from disco_jax.weights import inception as inception_weights
from disco_jax.weights import lpips as lpips_weights


def _to_rgb(gray, ab):
  return colour.lab_to_rgb(colour.denormalise_lab(gray, ab))  # (B, H, W, 3) in [0, 1]


def make_eval_fn(model, inception_variables=None, lpips_variables=None):
  """Jittable (variables, batch, key) -> per-example metrics `(B,)`, images and features."""

  def fn(variables, batch, key):
    out = model.apply(variables, batch['gray'], batch['ab'], test_mode=True, colours='mode',
                      rngs={'anchors': key})
    pred, truth = _to_rgb(batch['gray'], out['ab_pred']), _to_rgb(batch['gray'], batch['ab'])
    result = {'psnr': metrics.psnr(pred, truth), 'ssim': metrics.ssim(pred, truth),
              'colorfulness': metrics.colorfulness(pred),
              'colorfulness_gt': metrics.colorfulness(truth),
              'pred': pred, 'truth': truth, 'gray': _to_rgb(batch['gray'], 0 * batch['ab'])}
    if inception_variables is not None:
      result['feat_pred'] = inception_net.inception_features(inception_variables, pred)
      result['feat_truth'] = inception_net.inception_features(inception_variables, truth)
    if lpips_variables is not None:
      result['lpips'] = lpips_net.LPIPS().apply(lpips_variables, pred, truth)
    return result

  return fn


def on_folder(config, folder):
  """`config` evaluating every photo of `folder` (a directory of colour photos, made a TFDS
  dataset under config.input.data_dir once) instead of its own evaluation split."""
  config = config.copy_and_resolve_references()
  config.input.update(dataset='folder', folder=str(folder), eval_split='train')
  return config


def evaluate_workdir(workdir, step=None, best=False, inception=None, num_images=8,
                     max_batches=None, seed=130, config=None, out_dir=None, lpips=None):
  """Evaluates a run's checkpoint with its saved config (or `config`: that config with fields
  changed); writes to `out_dir` (default `workdir/eval`) and returns the metrics."""
  config, state = trainer.restore_trained(workdir, step, best, config)
  if config.task != 'disco':
    raise ValueError(f'{workdir} holds a {config.task} run; eval.py evaluates colorizers (stage 2)')
  # The step of the checkpoint read, which a damaged latest one may have made an earlier one.
  step = int(state.step)
  variables = {'params': state.params, **state.model_state}
  return evaluate(config, variables, out_dir or os.path.join(workdir, 'eval'), step, inception,
                  num_images, max_batches, seed, lpips)


def evaluate(config, variables, out_dir, step=None, inception=None, num_images=8,
             max_batches=None, seed=130, lpips=None):
  """Evaluates `variables` of the model `config.model` on `config.input.eval_split`.

  Also serves imported official weights: `eval.py --variables disco.msgpack --config ...`.
  `inception` and `lpips` name converted weights files (`weights.inception`, `weights.lpips`);
  without one, its metric is reported as unavailable with how to get the file.
  Writes `out_dir/metrics.json`, TensorBoard scalars and PNGs (through epath: `out_dir` may be a
  gs:// path); returns the metrics.
  """
  mesh = sharding.make_mesh(1)
  model = disco.from_config(config.model, tasks.uses_cpu_kernels(config, mesh.devices.flat),
                            mesh.devices.flat[0].platform)
  inception_variables, fid_note = None, None
  if inception:
    inception_variables = inception_weights.load_inception(inception)
  else:
    fid_note = ('unavailable: no InceptionV3 weights given (--inception FILE); get '
                f'{inception_weights.PYTORCH_FID_URL} and convert it with `python -m disco_jax.weights.inception '
                '--pytorch-fid pt_inception-2015-12-05-6726825d.pth --out inception_fid.msgpack`')
  # Loaded before anything runs, so that a missing or bad file stops the evaluation at once.
  lpips_variables = lpips_weights.load_lpips(lpips) if lpips else None
  batch_shard = sharding.batch_sharding(mesh)
  eval_fn = jax.jit(make_eval_fn(model, inception_variables, lpips_variables),
                    out_shardings=sharding.replicated(mesh))
  split = config.input.eval_split
  num_examples = pipeline.dataset_builder(config).info.splits[split].num_examples
  total = math.ceil(num_examples / config.input.global_batch_size)
  total = min(total, max_batches) if max_batches else total
  image_dir = epath.Path(out_dir) / 'images'
  image_dir.mkdir(parents=True, exist_ok=True)
  sums, count, written = {}, 0, 0
  stats = {k: metrics.FeatureStats() for k in ('pred', 'truth')} if inception else None
  progress = writers.Progress(total, 0)
  key = jax.random.key(seed)
  per_example = ('psnr', 'ssim', 'colorfulness', 'colorfulness_gt') + (('lpips',) if lpips else ())
  for i, batch in enumerate(pipeline.eval_batches(config, batch_shard, max_batches)):
    mask = np.asarray(batch['mask'])
    result = sharding.fetch(eval_fn(variables, batch, jax.random.fold_in(key, i)))
    for name in per_example:
      sums[name] = sums.get(name, 0.0) + float(np.sum(result[name][mask]))
    count += int(mask.sum())
    if stats:
      stats['pred'].update(result['feat_pred'], mask)
      stats['truth'].update(result['feat_truth'], mask)
    for j in np.nonzero(mask)[0]:
      if written < num_images:
        row = writers.image_grid([[result['gray'][j], result['pred'][j], result['truth'][j]]])
        png = io.BytesIO()
        Image.fromarray(row).save(png, format='PNG')
        (image_dir / f'{written:04d}.png').write_bytes(png.getvalue())
        written += 1
    logging.info('eval %s', progress.line(i + 1, {}, config.input.global_batch_size))
  if count == 0:
    raise ValueError(f'the evaluation split {split!r} of {config.input.dataset} gave no images')
  report = {k: v / count for k, v in sums.items()}
  report['colorfulness_gap'] = report['colorfulness'] - report['colorfulness_gt']
  if stats and count >= 2:
    report['fid'] = metrics.frechet_distance(stats['pred'].mean(), stats['pred'].cov(),
                                                 stats['truth'].mean(), stats['truth'].cov())
  else:
    report['fid'] = fid_note or 'unavailable: FID needs at least 2 images'
  if not lpips:
    report['lpips'] = 'unavailable: ' + lpips_weights.missing_weights_message(None)
  report.update(
      num_images=count, num_anchors=config.model.num_anchors, seed=seed, split=split,
      dataset=config.input.dataset, resolution=config.input.image_size, step=step,
      **({'folder': config.input.folder} if config.input.dataset == 'folder' else {}),
      colours='automatic: k-means on modeler features, most likely bins')
  (epath.Path(out_dir) / 'metrics.json').write_text(json.dumps(report, indent=2))
  writer = writers.MetricWriter(out_dir)
  writer.write_scalars(int(step or 0), {k: v for k, v in report.items()
                                                   if isinstance(v, float)})
  writer.close()
  return report
