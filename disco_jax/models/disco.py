"""The DISCO colorizer (`AnchorColorProb` of the official code) as a Linen module.

Data flow, NHWC, h = H / 16, w = W / 16, d = d_model, Q = 313 bins:

  gray (B,H,W,1) --SPixNet (frozen)--> assoc (B,H,W,9)
  gray --Backbone--> features (B,H,W,d) --SP-pool with assoc--> tokens (B,h,w,d), spix_ab (B,h,w,2)
  tokens --colour modeler (encoder + Linear d->Q)--> modeler_logits (B,h,w,Q)
  anchors: k-means (GT colours in training, modeler features at test) -> anchor_mask (B,h,w)
  [tokens ; mask * onehot(label) ; mask] --Linear--> hint_emb --colour generator--> generator_out
  generator_out --SP-diffuse--> diffused (B,H,W,d) --RefineNet([gray ; diffused])--> ab_pred (B,H,W,2)

The model is applied as a pure function: `DISCO(...).apply(variables, gray, ab, ...)`, where
`variables` holds 'params', 'batch_stats' (BatchNorm running statistics) and 'spectral' (the
spectral-norm power-iteration vectors). Randomness comes from the 'dropout' and 'anchors' rngs.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.models import layers
from disco_jax.models.backbone import Backbone
from disco_jax.models.refinenet import RefineNet
from disco_jax.models.spixnet import SPixNet
from disco_jax.models.transformer import Encoder, sine_position_encoding
from disco_jax.ops import anchors, colour, superpixel

COLOUR_SOURCES = ('gt', 'mode')
# config.model.dtype: compute dtype of convolutions and matmuls. float64 (with jax_enable_x64) is
# for parity checks against the official model's float64 runs (disco_jax/parity.py), not training.
DTYPES = ('float32', 'bfloat16', 'float64')
PRECISIONS = ('default', 'high', 'highest')
# matmul_precision 'auto' per platform. CPU: float32 is what XLA:CPU computes anyway. GPU: float32,
# as the official PyTorch model (no TF32); the pooling einsums are a small part of the step. TPU:
# one bfloat16 pass, the precision every other convolution and matmul of the model runs at there
# by default; 'highest' would make these einsums six passes (float32 runs that want them exact
# set 'highest').
AUTO_PRECISION = {'cpu': 'highest', 'gpu': 'highest', 'tpu': 'default'}


class DISCO(nn.Module):
  """DISCO with the released model's sizes by default."""
  spix_width: int = 16  # SPixNet first-level channels
  backbone_width: int = 64  # backbone first-block channels (x1, x2, x4, x8)
  refine_width: int = 64  # RefineNet first-level channels
  d_model: int = 64  # token width
  num_layers: int = 6  # per transformer branch; the supplementary's Table 1 says 5
  num_heads: int = 8
  ffn_dim: int = 256
  dropout: float = 0.1
  num_anchors: int = 8
  random_anchors: bool = False  # DISCO-rand: anchor sites drawn uniformly instead of by k-means
  # Compute dtype of convolutions and matmuls (jnp.bfloat16: mixed precision). Parameters stay
  # float32, and so do BatchNorm statistics, softmaxes, superpixel pooling, k-means and outputs
  # (float64 throughout with jnp.float64: see `layers.at_least_float32`).
  dtype: Any = jnp.float32
  # Training: the backbone and RefineNet keep only block outputs for the backward pass.
  remat: bool = False
  # kernels.cpu's custom VJPs in the CNNs (see models.layers): `kernels.cpu.wanted` of
  # config.model.cpu_kernels and the devices the model runs on.
  cpu_kernels: bool = False
  # The superpixel pooling and diffusing einsums' jax.lax.Precision ('highest': float32, as the
  # official model): `matmul_precision` of config.model.matmul_precision and the platform.
  matmul_precision: str = 'highest'

  def setup(self):
    self.segnet = SPixNet(self.spix_width, self.dtype, self.cpu_kernels)
    self.repnet = layers.rematerialised(Backbone, self.remat, static_argnums=(2,))(
        self.backbone_width, self.d_model, self.dtype, self.cpu_kernels)
    encoder = lambda: Encoder(self.num_layers, self.num_heads, self.ffn_dim, self.dropout,
                              self.dtype)
    self.wildpath = encoder()  # colour modeler
    self.hintpath = encoder()  # colour generator
    linear = lambda n: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                kernel_init=layers.xavier_uniform)
    self.mid_word_prj = linear(colour.NUM_BINS)
    self.trg_word_emb = linear(self.d_model)
    self.trg_word_prj = linear(colour.NUM_BINS)
    self.enhanceNet = layers.rematerialised(RefineNet, self.remat, static_argnums=(3,))(
        self.refine_width, dtype=self.dtype, cpu_kernels=self.cpu_kernels)

  def encode(self, gray, ab, train: bool = False):
    """Everything up to the colour modeler's logits.

    gray `(B, H, W, 1)` = (L - 50) / 50; ab `(B, H, W, 2)` = ab / 110 (ground truth in training, a
    hint image or anything at test, where only its superpixel means are used).
    """
    superpixel.check_size(*gray.shape[1:3])
    out_dtype = layers.at_least_float32(self.dtype)
    # SPixNet is frozen: running statistics, and no gradient reaches it.
    assoc = jax.lax.stop_gradient(self.segnet(gray, train=False))  # (B, H, W, 9)
    features = self.repnet(gray, train).astype(out_dtype)  # (B, H, W, d)
    pooled, conf_sum = superpixel.pool(jnp.concatenate([features, ab.astype(out_dtype)], -1),
                                       assoc, precision=self.matmul_precision)
    tokens, spix_ab = pooled[..., :-2], pooled[..., -2:]
    pos = sine_position_encoding(tokens.shape[1], tokens.shape[2], self.d_model)
    modeler_out = self.wildpath(tokens, pos, train)
    return dict(assoc=assoc, features=features, tokens=tokens, spix_ab=spix_ab,
                conf_sum=conf_sum, spix_size=superpixel.spixel_size(assoc), pos=pos,
                modeler_out=modeler_out,
                modeler_logits=self.mid_word_prj(modeler_out).astype(out_dtype))

  def decode(self, gray, enc, anchor_mask, anchor_label, train: bool = False):
    """Colour generator and RefineNet given anchors.

    anchor_mask `(B, h, w)` (1 at anchors), anchor_label `(B, h, w)` int bins, read only at anchors.
    """
    tokens = enc['tokens']
    out_dtype = layers.at_least_float32(self.dtype)
    mask = anchor_mask.astype(tokens.dtype)[..., None]  # (B, h, w, 1)
    hint = jax.nn.one_hot(anchor_label, colour.NUM_BINS, dtype=tokens.dtype) * mask
    hint_emb = self.trg_word_emb(jnp.concatenate([tokens, hint, mask], -1)).astype(out_dtype)
    generator_out = self.hintpath(hint_emb, enc['pos'], train)
    diffused = superpixel.diffuse(generator_out, enc['assoc'], precision=self.matmul_precision)
    return dict(hint_emb=hint_emb, generator_out=generator_out,
                generator_logits=self.trg_word_prj(generator_out).astype(out_dtype),
                diffused=diffused,
                ab_pred=self.enhanceNet(gray, diffused, train))

  def locate_anchors(self, enc, test_mode: bool):
    """Anchor mask `(B, h, w)`: k-means on GT colours (training) or modeler features (test)."""
    b, h, w = enc['spix_size'].shape
    key = self.make_rng('anchors')
    if self.random_anchors:
      return anchors.random_anchors(key, b, h, w, self.num_anchors)
    feats = enc['modeler_out'] if test_mode else enc['spix_ab']
    return anchors.kmeans_anchors(key, jax.lax.stop_gradient(feats), enc['spix_size'],
                                  self.num_anchors)

  def __call__(self, gray, ab, train: bool = False, test_mode: bool = False,
               colours: str = 'gt', anchor_mask=None, anchor_label=None):
    """The full forward: returns every stage of `encode` and `decode` plus the anchors.

    test_mode: where to cluster (False: GT superpixel colours, as training; True: the modeler's
      features, as inference). colours: 'gt' labels anchors with the nearest bin of their
      superpixel's mean `ab` (training, and user edits at test); 'mode' with the modeler's most
      probable bin (automatic colorization).
    anchor_mask `(B, h, w)`, optional: given anchors; the anchor search (and its rng) is skipped.
    anchor_label `(B, h, w)` int, optional: given labels of every token, in place of `colours`
      (the parity fixtures give both, `disco_jax/parity.py`).
    """
    if colours not in COLOUR_SOURCES:
      raise ValueError(f'colours must be one of {COLOUR_SOURCES}, got {colours!r}')
    enc = self.encode(gray, ab, train)
    if anchor_mask is None:
      anchor_mask = self.locate_anchors(enc, test_mode)
    if anchor_label is not None:
      anchor_label = jnp.asarray(anchor_label, jnp.int32)
    elif colours == 'gt':
      anchor_label = colour.nearest_bin(jax.lax.stop_gradient(enc['spix_ab']))
    else:
      anchor_label = anchors.mode_labels(enc['modeler_logits'])
    dec = self.decode(gray, enc, anchor_mask, anchor_label, train)
    return dict(enc, **dec, anchor_mask=anchor_mask, anchor_label=anchor_label)


def init_variables(model: DISCO, seed: int = 0):
  """Fresh variables for `model`, deterministic in `seed`.

  The shapes do not depend on the image size, so the init traces the smallest valid image, one
  superpixel, and skips the anchor search. Its key uses the 'rbg' generator: with threefry, XLA
  spends most of a minute compiling the ~400 random initialisers, with rbg a few seconds.
  """
  key = jax.random.key(seed, impl='rbg')
  gray = jnp.zeros((1, superpixel.STRIDE, superpixel.STRIDE, 1), jnp.float32)
  ab = jnp.zeros((1, superpixel.STRIDE, superpixel.STRIDE, 2), jnp.float32)

  def init(key):
    def touch_all(module, gray, ab):
      enc = module.encode(gray, ab)
      no_anchor = jnp.zeros(enc['spix_size'].shape)
      return module.decode(gray, enc, no_anchor, no_anchor.astype(jnp.int32))

    return model.init({'params': key}, gray, ab, method=touch_all)

  return jax.jit(init)(key)


def count_params(params, prefix: Optional[str] = None) -> int:
  """Number of parameter values, optionally of one top-level submodule."""
  tree = params[prefix] if prefix else params
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def matmul_precision(setting: str, platform: str) -> str:
  """config.model.matmul_precision for a model compiled for `platform` ('cpu', 'gpu', 'tpu')."""
  if setting not in PRECISIONS + ('auto',):
    raise ValueError(f'config.model.matmul_precision={setting!r} must be one of '
                     f"{PRECISIONS + ('auto',)}")
  return AUTO_PRECISION.get(platform, 'highest') if setting == 'auto' else setting


def from_config(model_config, cpu_kernels: bool = False, platform: str = 'cpu') -> DISCO:
  """A DISCO module from the `config.model` fields of `configs/disco.py`; `cpu_kernels` is the
  resolved `config.model.cpu_kernels` setting (`kernels.cpu.wanted`), `platform` the one of the
  devices it is compiled for (which `matmul_precision` 'auto' follows)."""
  fields = dict(model_config, cpu_kernels=cpu_kernels)
  fields['matmul_precision'] = matmul_precision(fields.get('matmul_precision', 'auto'), platform)
  dtype = jnp.dtype(fields.get('dtype', 'float32')).name
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={fields['dtype']!r} must be one of {DTYPES}")
  fields['dtype'] = jnp.dtype(dtype)
  if fields['d_model'] % fields['num_heads']:
    raise ValueError(f"config.model.d_model={fields['d_model']} must be divisible by "
                     f"config.model.num_heads={fields['num_heads']}")
  if not 1 <= fields['num_anchors']:
    raise ValueError(f"config.model.num_anchors must be at least 1, got {fields['num_anchors']}")
  return DISCO(**fields)
