"""Stage 1, the superpixel network SPixNet.

  python train.py --config configs/spixnet.py --workdir ckpt/spixnet
  python train.py --config configs/spixnet.py:demo --workdir runs/demo_spixnet

Released recipe: ImageNet squashed to 256x256 (bicubic), batch 256 (128 per GPU x 2), Adam 2e-4,
20 epochs, loss 10 |ab error| + 0.003 |xy error| / 16 through pool + diffuse.

Schedule: the official script calls its scheduler with the arguments misplaced, which makes the
learning rate a constant 20 x 2e-4 = 4e-3. We use the schedule it meant, the same linear per-epoch
decay as stage 2 over 20 epochs; `--config.optim.schedule=constant
--config.optim.learning_rate=4e-3` reproduces the bug if you need it.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # pylint: disable=g-import-not-at-top

VARIANTS = ('', 'demo', 'tiny')


def get_config(variant: str = ''):
  config = base_config('spixnet', variant, VARIANTS)
  config.model.spix_width = 16  # first-level channels; each of the 5 levels doubles it
  config.loss = ml_collections.ConfigDict()
  config.loss.ab_weight = 10.0  # colour reconstruction term
  config.loss.xy_weight = 0.003  # position reconstruction term (pixels / 16)
  config.input.global_batch_size = 256
  config.optim.num_epochs = 20
  if variant in ('demo', 'tiny'):
    config.model.spix_width = 8 if variant == 'demo' else 4
    config.input.update(dataset='demo', image_size=64, resize='random_crop', random_flip=True,
                        global_batch_size=8, shuffle_buffer=64, eval_split='train')
    config.optim.update(learning_rate=1e-3, schedule='constant', num_epochs=1, num_steps=150)
    config.ckpt.update(every_steps=50, keep=2)
    config.eval.update(every_steps=50, max_batches=2)
    config.log.update(every_steps=10, images_every_steps=50, num_images=4)
  return config
