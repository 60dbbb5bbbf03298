"""Train DISCO: `python train.py --config configs/disco.py[:variant] --workdir DIR`.

Any config field can be overridden, e.g. `--config.input.global_batch_size=48`. Rerunning the same
command continues from the latest checkpoint in DIR. Multi-host: run the same command on every host
with --coordinator_address=HOST0:PORT --num_processes=N --process_id=I (on Cloud TPU pods the
three are detected automatically with --distributed).
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/FILE.py[:variant]',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'checkpoints, logs and samples go here')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize()')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process\'s index')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from disco_jax.training import compiled_stats  # pylint: disable=g-import-not-at-top
  compiled_stats.schedule_for_memory()
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from disco_jax.training import checkpoint, trainer, validate  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS log every save and read at INFO through absl's logger: keep their warnings only.
  logging.getLogger('absl').setLevel(logging.WARNING)
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (validate.ConfigError, trainer.NonFiniteLoss, trainer.Diverged,
          checkpoint.IncompatibleCheckpointError, checkpoint.DamagedCheckpointError) as e:
    sys.exit(f'error: {e}')
  except trainer.Preempted as e:
    logging.warning('%s', e)
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main)
