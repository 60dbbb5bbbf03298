"""Stage 2, the DISCO colorizer, with the released recipe.

  python train.py --config configs/disco.py --workdir ckpt/disco     # the released recipe
  python train.py --config configs/disco.py:demo --workdir runs/demo  # a variant
  python train.py --config configs/disco.py --config.model.num_layers=5 --workdir ckpt/t1

Released recipe: ImageNet squashed to 256x256 (bicubic), global batch 96, Adam 2e-4 (0.9, 0.999),
60 epochs with the linear per-epoch decay, colorfulness 0.5, 8 anchors, both rebalanced CE heads
plus 5 x VGG19, SPixNet frozen from a stage-1 checkpoint (`spixnet_checkpoint`).

Variants:
  rand  DISCO-rand: random anchor sites and the cosine schedule (CosineAnnealingLR, T_max 60).
  c02   DISCO-c0.2: colorfulness 0.2.
  bf16  the released recipe in mixed precision (convolutions and matmuls in bfloat16), for GPUs
        and TPUs.
  demo  the CPU demo on the photos shipped with scikit-image: small widths, 64 px random crops,
        no perceptual loss (no VGG19 weights on a fresh machine), an ab L1 term in its place.
  tiny  the smallest model, for tests.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # pylint: disable=g-import-not-at-top

VARIANTS = ('', 'rand', 'c02', 'bf16', 'demo', 'tiny')


def get_config(variant: str = ''):
  config = base_config('disco', variant, VARIANTS)
  config.spixnet_checkpoint = ''  # stage-1 workdir or converted SPixNet .msgpack (required)

  m = config.model
  m.spix_width = 16  # SPixNet first-level channels (must match the stage-1 checkpoint)
  m.backbone_width = 64  # backbone first-block channels; blocks use x1, x2, x4, x8
  m.refine_width = 64  # RefineNet first-level channels
  m.d_model = 64  # token width of both transformer branches
  m.num_layers = 6  # layers per branch: 6 in the released code, 5 in the supplementary's Table 1
  m.num_heads = 8  # attention heads (head width d_model / num_heads)
  m.ffn_dim = 256  # transformer feed-forward width
  m.dropout = 0.1  # transformer dropout (attention probabilities and both sublayers)
  m.num_anchors = 8  # colour anchors per image (k of the k-means)
  m.random_anchors = False  # True: DISCO-rand's uniformly random anchor sites

  config.loss = ml_collections.ConfigDict()
  config.loss.colorfulness = 0.5  # class rebalancing, lambda = 1 - colorfulness
  config.loss.perceptual_weight = 5.0  # weight of the VGG19 term; 0 trains without VGG19
  config.loss.vgg_weights = ''  # vgg19.msgpack (see README, "VGG19 for the perceptual loss")
  config.loss.ab_l1_weight = 0.0  # mean |ab error| on the RefineNet output; not in the official
  # recipe, where only the VGG term trains the RefineNet: the demo uses it in the VGG term's place

  if variant == 'rand':
    m.random_anchors = True
    config.optim.schedule = 'cosine_epoch'
  elif variant == 'c02':
    config.loss.colorfulness = 0.2
  elif variant == 'bf16':
    m.dtype = 'bfloat16'
  elif variant in ('demo', 'tiny'):
    if variant == 'demo':
      m.update(spix_width=8, backbone_width=16, refine_width=16, d_model=32, num_layers=2,
               num_heads=4, ffn_dim=64, num_anchors=4)
    else:
      m.update(spix_width=4, backbone_width=8, refine_width=8, d_model=16, num_layers=2,
               num_heads=2, ffn_dim=32, num_anchors=3)
    config.loss.perceptual_weight = 0.0  # no VGG19 weights on a fresh machine...
    config.loss.ab_l1_weight = 10.0  # ...so the RefineNet learns from an ab L1 term instead
    config.input.update(dataset='demo', image_size=64, resize='random_crop', random_flip=True,
                        global_batch_size=8, shuffle_buffer=64, train_split='train',
                        eval_split='train')
    config.optim.update(learning_rate=1e-3, schedule='constant', num_epochs=1, num_steps=300)
    config.ckpt.update(every_steps=100, keep=2)
    config.eval.update(every_steps=100, max_batches=2)
    config.log.update(every_steps=10, images_every_steps=100, num_images=4)
  return config
