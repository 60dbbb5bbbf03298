"""Config validation: every mistake we can see before compiling, named by its field.

It only looks: no dataset is prepared and nothing is downloaded or written (the trainer prepares
datasets when training starts, and logs it).
"""
import os

import jax

from disco_jax.data import pipeline
from disco_jax.kernels import cpu
from disco_jax.models import disco
from disco_jax.training import optim, tasks

TASKS = ('spixnet', 'disco')


class ConfigError(ValueError):
  """One or more config fields have values training cannot use."""


def _problems(config):
  """Yields 'config.field=value: why' for each bad field."""
  def bad(field, value, why):
    return f'config.{field}={value!r}: {why}'

  if config.task not in TASKS:
    yield bad('task', config.task, f'must be one of {TASKS}')
  i = config.input
  problem = pipeline.check_dataset(config)  # looks at files only: nothing prepared or downloaded
  if problem:
    yield f'config.{problem}'
  if i.image_size < 16 or i.image_size % 16:
    yield bad('input.image_size', i.image_size, 'must be a positive multiple of 16')
  n = jax.device_count()
  if i.global_batch_size <= 0 or i.global_batch_size % n:
    yield bad('input.global_batch_size', i.global_batch_size,
              f'must be a positive multiple of the device count {n}')
  if config.mesh.fsdp < 1 or n % config.mesh.fsdp:
    yield bad('mesh.fsdp', config.mesh.fsdp, f'must divide the device count {n}')
  if config.model.dtype not in disco.DTYPES:
    yield bad('model.dtype', config.model.dtype, f'must be one of {disco.DTYPES}')
  if not isinstance(config.model.remat, bool):
    yield bad('model.remat', config.model.remat, 'must be True or False')
  if config.model.cpu_kernels not in cpu.SETTINGS:
    yield bad('model.cpu_kernels', config.model.cpu_kernels, f'must be one of {cpu.SETTINGS}')
  o = config.optim
  if o.schedule not in optim.SCHEDULES:
    yield bad('optim.schedule', o.schedule, f'must be one of {optim.SCHEDULES}')
  for field, value in (('optim.learning_rate', o.learning_rate),
                       ('optim.num_epochs', o.num_epochs),
                       ('ckpt.every_steps', config.ckpt.every_steps),
                       ('ckpt.keep', config.ckpt.keep), ('log.every_steps', config.log.every_steps)):
    if value <= 0:
      yield bad(field, value, 'must be positive')
  if o.warmup_steps < 0:
    yield bad('optim.warmup_steps', o.warmup_steps, 'must be >= 0 (0 = off)')
  if o.max_update_ratio < 0:
    yield bad('optim.max_update_ratio', o.max_update_ratio, 'must be >= 0 (0 = no check)')
  if config.init_from and not os.path.isfile(config.init_from):
    yield bad('init_from', config.init_from, 'no such file: name an official DISCO or SPixelNet '
              '.pth/.pth.tar or a converted .msgpack, or leave it empty for a random start')
  if not (config.debug.nan_at_step == -1 or config.debug.nan_at_step >= 1):
    yield bad('debug.nan_at_step', config.debug.nan_at_step,
              'must be -1 (off) or a step number >= 1')
  if config.task != 'disco':
    return
  m = config.model
  if m.d_model % m.num_heads:
    yield bad('model.num_heads', m.num_heads, f'must divide model.d_model={m.d_model}')
  tokens = (i.image_size // 16) ** 2
  if not 1 <= m.num_anchors <= tokens:
    yield bad('model.num_anchors', m.num_anchors,
              f'must lie in 1..{tokens}, the token count at input.image_size={i.image_size}')
  if not 0 <= config.loss.colorfulness <= 1:
    yield bad('loss.colorfulness', config.loss.colorfulness, 'must lie in [0, 1]')
  spix = config.spixnet_checkpoint
  # Both kinds of init_from file hold a SPixNet, which then takes the stage-1 checkpoint's place.
  found = os.path.isfile(spix) or os.path.isfile(os.path.join(spix, tasks.SPIXNET_EXPORT))
  if (spix or not config.init_from) and not found:
    yield bad('spixnet_checkpoint', spix,
              'stage 2 needs the frozen SPixNet of stage 1: a finished stage-1 workdir (holding '
              f'{tasks.SPIXNET_EXPORT}) or a converted SPixelNet .msgpack (see README), or '
              'config.init_from')
  if config.loss.perceptual_weight > 0 and not os.path.isfile(config.loss.vgg_weights):
    yield bad('loss.vgg_weights', config.loss.vgg_weights,
              'a perceptual weight above 0 needs VGG19 weights: see README, "VGG19 for the '
              'perceptual loss", or set --config.loss.perceptual_weight=0')


def validate_config(config):
  """Raises ConfigError listing every bad field, before anything compiles or trains."""
  problems = list(_problems(config))
  if problems:
    raise ConfigError('the config cannot be used:\n  ' + '\n  '.join(problems))
