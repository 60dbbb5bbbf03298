"""The config tree shared by both training stages (`configs/spixnet.py`, `configs/disco.py`).

Each field's comment gives its unit and meaning. Stage files set the fields that differ; variants
change a few fields of that one tree and never copy it.
"""
import ml_collections


def base_config(task: str, variant: str, variants) -> ml_collections.ConfigDict:
  """The shared tree for `task`, after checking that the config file offers `variant`."""
  if variant not in variants:
    raise ValueError(f'unknown variant {variant!r} of configs/{task}.py; choose one of '
                     f'{[v for v in variants if v]} or none')
  config = ml_collections.ConfigDict()
  config.task = task  # 'spixnet' (stage 1) or 'disco' (stage 2)
  config.variant = variant  # the variant the config file was loaded with, for the record
  config.seed = 0  # parameters, data order, dropout and anchors all derive from it
  config.init_from = ''  # weights a NEW run starts from (fine-tuning): an official DISCO or
  # SPixelNet .pth/.pth.tar, or a converted .msgpack; fresh optimizer, step 0. '' = random init.
  # A run resuming from its own checkpoint ignores it.

  config.input = ml_collections.ConfigDict()
  i = config.input
  i.dataset = 'imagenet2012'  # 'imagenet2012' | 'coco/2017' | 'folder' | 'demo'
  i.data_dir = ''  # TFDS data dir ('' = TFDS' default, ~/tensorflow_datasets)
  i.folder = ''  # the photos of dataset 'folder' (a directory of JPEG/PNG files)
  i.train_split = 'train'  # TFDS split string
  i.eval_split = 'validation[:10%]'  # official: a fixed 10% subset of ImageNet val
  i.image_size = 256  # training resolution in pixels, a multiple of 16
  i.resize = 'squash'  # 'squash' (official: bicubic to size x size) | 'random_crop'
  i.crop_min_scale = 0.5  # random_crop: smallest crop side, as a fraction of the shorter side
  i.random_flip = False  # horizontal flips (not in the official recipe)
  i.global_batch_size = 96  # images per step over all devices and hosts
  i.shuffle_buffer = 10_000  # examples
  i.prefetch = 2  # batches prefetched onto the devices

  config.optim = ml_collections.ConfigDict()
  o = config.optim
  o.learning_rate = 2e-4  # Adam base learning rate
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0  # coupled L2 as torch's Adam(weight_decay=...)
  o.schedule = 'linear_epoch'  # 'linear_epoch' | 'cosine_epoch' | 'constant'
  o.warmup_steps = 0  # steps of linear warm-up: lr scaled by min(1, step / warmup_steps) on top
  # of the schedule (large pod batches); 0 = off (official: off)
  o.final_factor = 0.01  # linear_epoch: lr(e) = lr (1 - (1 - final_factor) e / num_epochs)
  o.num_epochs = 60  # length of the run in epochs (sets the schedule)
  o.num_steps = -1  # if > 0, stop after this many steps instead (the schedule keeps its epochs)
  o.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 = off (official: off)
  o.max_update_ratio = 1.0  # stop as diverged when one step would move the parameters by more
  # than this fraction of their global norm (Adam's first steps at lr 1e-3 move ~1e-2); 0 = off

  config.model = ml_collections.ConfigDict()  # the stage files add the architecture's fields
  config.model.dtype = 'float32'  # 'bfloat16': convolutions and matmuls in bf16 (accelerators);
  # parameters, optimizer state, BatchNorm statistics and the loss stay float32
  config.model.remat = False  # recompute activations inside blocks in the backward pass: less
  # memory for about one more forward of compute
  config.model.cpu_kernels = 'auto'  # the custom VJPs of disco_jax/kernels/cpu.py, tuned for
  # XLA:CPU: 'on' | 'off' | 'auto' (on where the devices the step is compiled for are CPUs)
  config.model.matmul_precision = 'auto'  # of the superpixel pooling einsums: 'default' |
  # 'high' | 'highest' | 'auto' (per platform: 'highest' on CPU and GPU, 'default' on TPU; see
  # disco_jax/models/disco.py)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.fsdp = 1  # devices along the 'fsdp' axis (parameter sharding); the rest is 'data'

  config.ckpt = ml_collections.ConfigDict()
  config.ckpt.every_steps = 1000  # save a checkpoint every this many steps (and at the end)
  config.ckpt.keep = 3  # latest checkpoints kept, plus the best by validation loss

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 5000  # validation loss every this many steps (and at the end)
  config.eval.max_batches = 50  # cap per validation pass; -1 = the whole split

  config.log = ml_collections.ConfigDict()
  config.log.every_steps = 50  # progress line and scalars
  config.log.images_every_steps = 1000  # sample grid (gray | prediction | truth, anchors marked)
  config.log.num_images = 4  # rows of the sample grid

  config.debug = ml_collections.ConfigDict()  # test hooks: leave them off in real runs
  config.debug.nan_at_step = -1  # put a NaN into the input image of this step (1-based, as
  # logged), to test that a non-finite loss stops the run; -1 = off
  return config
