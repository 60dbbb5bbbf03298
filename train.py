"""Train DISCO: `python train.py --config configs/disco.py[:variant] --workdir DIR`.

Any config field can be overridden, e.g. `--config.input.global_batch_size=48`. Rerunning the same
command continues from the latest checkpoint in DIR. `--config.init_from=disco-beta.pth.tar` (an
official DISCO or SPixelNet checkpoint, or a converted .msgpack) starts a new run from those
weights. Multi-host: run the same command on every host with --coordinator_address=HOST0:PORT
--num_processes=N --process_id=I (on Cloud TPU pods the three are detected automatically with
--distributed). Installed, the same command is `disco-train` (disco_jax.cli).
"""
from disco_jax import cli

if __name__ == '__main__':
  cli.train()
