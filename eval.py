"""Evaluate a colorizer.

  python eval.py --workdir DIR [--step N | --best] [--inception F]
  python eval.py --variables disco.msgpack --config configs/disco.py --out eval_official/ \
      [--config.input.dataset=folder --config.input.folder=photos/]

With --workdir: restores the latest checkpoint of DIR (or step N, or the best by validation loss)
with the config saved there. With --variables: weights converted from an official checkpoint
(`python -m disco_jax.weights.convert`), the model and data of --config. Either way it colorizes the
evaluation split automatically and writes metrics.json (PSNR, SSIM, colorfulness and its gap to
the ground truth, FID when --inception names the converted pytorch-fid weights), TensorBoard
scalars and side-by-side PNGs (gray | ours | truth) to DIR/eval or --out.
"""
import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'the training run to evaluate')
_VARIABLES = flags.DEFINE_string('variables', None, 'converted weights (instead of --workdir)')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'with --variables: configs/FILE.py[:v]')
_OUT = flags.DEFINE_string('out', 'eval_out', 'with --variables: where the results go')
_STEP = flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)')
_BEST = flags.DEFINE_bool('best', False, 'the checkpoint with the lowest validation loss')
_INCEPTION = flags.DEFINE_string('inception', None,
                                 'InceptionV3 weights for FID (python -m disco_jax.weights.inception)')
_LPIPS = flags.DEFINE_string('lpips', None, 'AlexNet weights for LPIPS, reported in metrics.json '
                             '(python -m disco_jax.weights.lpips)')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'side-by-side PNGs to write')
_MAX_BATCHES = flags.DEFINE_integer('max_batches', None, 'stop after this many batches')
_SEED = flags.DEFINE_integer('seed', 130, 'k-means seed (130: the official inference seed)')


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.WARNING)
  from disco_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from disco_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from disco_jax.weights import convert  # pylint: disable=g-import-not-at-top
  if bool(_WORKDIR.value) == bool(_VARIABLES.value):
    sys.exit('error: give exactly one of --workdir (a training run) or --variables (weights)')
  if _VARIABLES.value and _CONFIG.value is None:
    sys.exit('error: --variables needs --config for the model sizes and the data to evaluate on')
  common = dict(inception=_INCEPTION.value, num_images=_NUM_IMAGES.value,
                max_batches=_MAX_BATCHES.value, seed=_SEED.value, lpips=_LPIPS.value)
  try:
    if _WORKDIR.value:
      metrics = evaluator.evaluate_workdir(_WORKDIR.value, _STEP.value, _BEST.value, **common)
    else:
      metrics = evaluator.evaluate(_CONFIG.value, convert.load_variables(_VARIABLES.value),
                                   _OUT.value, **common)
  except (FileNotFoundError, ValueError, checkpoint.DamagedCheckpointError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(metrics, indent=2))


if __name__ == '__main__':
  app.run(main)
