"""The commands: `disco-train`, `disco-eval`, `disco-colorize`, `disco-convert`, `disco-export`.

`train.py` and `eval.py` at the repository root call `train` and `evaluate` here, so
`python train.py ...` and `disco-train ...` take the same flags. `--config` names a config file by
its path (`configs/disco.py[:variant]` in a clone; any copy of that folder elsewhere).
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags


def _quiet_logs():
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS log every save and read at INFO through absl's logger: keep their warnings only.
  logging.getLogger('absl').setLevel(logging.WARNING)


def train(argv=None):
  """disco-train: `--config FILE.py[:variant] --workdir DIR [--config.x=y ...]` (see train.py)."""
  config = config_flags.DEFINE_config_file('config', None, 'configs/FILE.py[:variant]',
                                           lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'checkpoints, logs and samples go here')
  distributed = flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize()')
  coordinator = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
  num_processes = flags.DEFINE_integer('num_processes', None, 'number of processes')
  process_id = flags.DEFINE_integer('process_id', None, 'this process\'s index')
  flags.mark_flags_as_required(['config', 'workdir'])

  def main(argv):
    del argv
    # Before jax is imported: the flag is read when the CPU backend starts.
    from disco_jax.training import compiled_stats  # pylint: disable=g-import-not-at-top
    compiled_stats.schedule_for_memory()
    import jax  # pylint: disable=g-import-not-at-top
    if distributed.value or coordinator.value:
      jax.distributed.initialize(coordinator.value, num_processes.value, process_id.value)
    from disco_jax.training import checkpoint, trainer, validate  # pylint: disable=g-import-not-at-top
    _quiet_logs()
    try:
      trainer.train_and_evaluate(config.value, workdir.value)
    except (validate.ConfigError, trainer.NonFiniteLoss, trainer.Diverged,
            checkpoint.IncompatibleCheckpointError, checkpoint.DamagedCheckpointError) as e:
      sys.exit(f'error: {e}')
    except trainer.Preempted as e:
      logging.warning('%s', e)
      sys.exit(trainer.PREEMPTED_EXIT_CODE)

  app.run(main, argv)


def argv_value(argv, name):
  """The value of `--name` in `argv` (`--name=v` or `--name v`), or None: read before absl parses
  the flags, because which `--config` flag eval defines depends on `--workdir`."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def evaluate(argv=None):
  """disco-eval: `--workdir DIR [--config.x=y ...] [--folder PHOTOS]` or `--variables F --config
  FILE.py` (see eval.py)."""
  argv = list(sys.argv if argv is None else argv)
  run_dir = argv_value(argv, 'workdir')
  if run_dir is not None:
    if argv_value(argv, 'config') is not None:
      sys.exit(f'error: --workdir {run_dir} evaluates with the config saved in the run; give '
               'changes to it as --config.x=y (e.g. --config.input.eval_split=validation), not '
               '--config FILE')
    from disco_jax.training import trainer  # pylint: disable=g-import-not-at-top
    try:
      saved = trainer.load_config(run_dir)
    except FileNotFoundError as e:
      sys.exit(f'error: {e}')
    config = config_flags.DEFINE_config_dict('config', saved, 'the run\'s saved config: '
                                             'override fields with --config.x=y', lock_config=True)
  else:
    config = config_flags.DEFINE_config_file('config', None, 'with --variables: '
                                             'configs/FILE.py[:variant]', lock_config=True)
  flags.DEFINE_string('workdir', None, 'the training run to evaluate (its disco/ stage folder)')
  variables = flags.DEFINE_string('variables', None, 'weights instead of --workdir: a converted '
                                  '.msgpack or an official .pth/.pth.tar')
  out = flags.DEFINE_string('out', None, 'where the results go (default: WORKDIR/eval, or '
                            'eval_out with --variables); a gs:// path works')
  folder = flags.DEFINE_string('folder', None, 'evaluate on this folder of colour photos instead '
                               'of the config\'s evaluation split')
  step = flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)')
  best = flags.DEFINE_bool('best', False, 'the checkpoint with the lowest validation loss')
  inception = flags.DEFINE_string('inception', None, 'InceptionV3 weights for FID '
                                  '(python -m disco_jax.weights.inception)')
  lpips = flags.DEFINE_string('lpips', None, 'AlexNet weights for LPIPS, reported in metrics.json '
                              '(python -m disco_jax.weights.lpips)')
  num_images = flags.DEFINE_integer('num_images', 8, 'side-by-side PNGs to write')
  max_batches = flags.DEFINE_integer('max_batches', None, 'stop after this many batches')
  seed = flags.DEFINE_integer('seed', 130, 'k-means seed (130: the official inference seed)')

  def main(argv):
    del argv
    _quiet_logs()
    import json  # pylint: disable=g-import-not-at-top
    from disco_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
    from disco_jax.models import disco  # pylint: disable=g-import-not-at-top
    from disco_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
    from disco_jax.weights import convert  # pylint: disable=g-import-not-at-top
    if bool(run_dir) == bool(variables.value):
      sys.exit('error: give exactly one of --workdir (a training run) or --variables (weights)')
    if variables.value and config.value is None:
      sys.exit('error: --variables needs --config for the model sizes and the data to evaluate on')
    cfg = config.value
    if folder.value:
      cfg = evaluator.on_folder(cfg, folder.value)
    common = dict(inception=inception.value, num_images=num_images.value,
                  max_batches=max_batches.value, seed=seed.value, lpips=lpips.value)
    try:
      if run_dir:
        metrics = evaluator.evaluate_workdir(run_dir, step.value, best.value, config=cfg,
                                             out_dir=out.value, **common)
      else:
        weights = convert.import_variables(variables.value, disco.from_config(cfg.model))
        metrics = evaluator.evaluate(cfg, weights, out.value or 'eval_out', **common)
    except (FileNotFoundError, ValueError, checkpoint.DamagedCheckpointError) as e:
      sys.exit(f'error: {e}')
    print(json.dumps(metrics, indent=2))

  app.run(main, argv)


def colorize():
  """disco-colorize: `python -m disco_jax.inference.colorize`'s flags."""
  from disco_jax.inference import colorize as colorize_lib  # pylint: disable=g-import-not-at-top
  sys.exit(colorize_lib.main())


def convert():
  """disco-convert: `python -m disco_jax.weights.convert`'s arguments."""
  from disco_jax.weights import convert as convert_lib  # pylint: disable=g-import-not-at-top
  convert_lib.main()


def export():
  """disco-export: `python -m disco_jax.inference.export`'s arguments."""
  from disco_jax.inference import export as export_lib  # pylint: disable=g-import-not-at-top
  sys.exit(export_lib.main())
