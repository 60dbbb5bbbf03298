"""DISCO's losses as pure functions."""
import jax
import jax.numpy as jnp

from disco_jax.models import vgg
from disco_jax.ops import colour, superpixel
from disco_jax.weights import vgg19


def cross_entropy(logits, labels):
  """Per-token cross-entropy `(...)` from logits `(..., Q)` and int labels `(...)`."""
  # At least float32 (bfloat16 logits), and float64 stays float64 (parity runs).
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def rebalanced_cross_entropy(logits, labels, class_weights):
  """mean(stop_gradient(w[label]) * CE): the gradient of the official rebalanced CE.

  The official code scales the logits' gradient by w in a custom backward and reports the plain
  CE; this loss has exactly that gradient, while its value is the weighted mean.
  logits `(B, h, w, Q)`, labels `(B, h, w)`, class_weights `(Q,)`.
  """
  w = jax.lax.stop_gradient(class_weights[labels])
  return jnp.mean(w * cross_entropy(logits, labels))


def spixel_loss(assoc, ab_n, ab_weight=10.0, xy_weight=0.003):
  """SPixNet's pretraining loss: reconstruct colour and position through pool + diffuse.

  assoc `(B, H, W, 9)`, ab_n `(B, H, W, 2)`. Positions are raw pixel coordinates (x first); the xy
  term is divided by the stride. Per-pixel L2 norms (not squared), averaged over pixels.
  """
  b, height, width, _ = assoc.shape
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing='ij')
  xy = jnp.broadcast_to(jnp.stack([xs, ys], -1), (b, height, width, 2))
  target = jnp.concatenate([ab_n.astype(jnp.float32), xy], -1)
  recon = superpixel.reconstruct(target, assoc.astype(jnp.float32))
  err = recon - target

  def norm(e):  # L2 norm with a zero (not NaN) gradient at 0, as torch's norm has; NaN stays NaN
    sq = jnp.sum(jnp.square(e), -1)
    return jnp.where(sq == 0, 0.0, jnp.sqrt(jnp.where(sq == 0, 1.0, sq)))

  ab_term = jnp.mean(norm(err[..., :2]))
  xy_term = jnp.mean(norm(err[..., 2:])) / superpixel.STRIDE
  return ab_weight * ab_term + xy_weight * xy_term


def perceptual_loss(vgg_params, vgg_mode, gray, ab_pred, ab_gt, dtype=jnp.float32, remat=False,
                    cpu_kernels=False):
  """The VGG19 term on RGB built from Lab(L_gt, ab_pred) and Lab(L_gt, ab_gt).

  gray `(B, H, W, 1)`, ab_pred and ab_gt `(B, H, W, 2)`, all normalised; VGG19 runs in `dtype`,
  rematerialised with `remat`, with kernels.cpu's ops if `cpu_kernels`.
  """
  rgb_pred = colour.lab_to_rgb_for_loss(gray, ab_pred)
  rgb_gt = colour.lab_to_rgb_for_loss(gray, ab_gt)
  return vgg.perceptual_loss(vgg_params, vgg_mode, rgb_pred, rgb_gt, dtype, remat, cpu_kernels)


def disco_loss(outputs, gray, ab, class_weights, vgg_params=None, vgg_mode='torch',
               perceptual_weight=5.0, ab_l1_weight=0.0, dtype=jnp.float32, remat=False,
               cpu_kernels=False):
  """Total loss of the released recipe and its terms: CE_w(modeler) + CE_w(generator) + 5 L_vgg.

  outputs: the dict of `DISCO.__call__` in training (its `anchor_label` holds the GT bin of every
  token, the targets of both heads). Returns (total, {term: value}); the terms are the weighted
  values that make up the total. A positive `perceptual_weight` needs VGG19 weights.
  `ab_l1_weight` adds mean |ab_pred - ab|, which the official recipe does not have: it gives the
  RefineNet a training signal when there are no VGG19 weights (the CPU demo). `dtype`, `remat` and
  `cpu_kernels`: VGG19's compute dtype, rematerialisation and ops (as the model's).
  """
  labels = outputs['anchor_label']
  terms = {
      'ce_modeler': rebalanced_cross_entropy(outputs['modeler_logits'], labels, class_weights),
      'ce_generator': rebalanced_cross_entropy(outputs['generator_logits'], labels, class_weights),
  }
  if perceptual_weight > 0:
    if vgg_params is None:
      raise ValueError('a perceptual loss weight above 0 needs VGG19 weights:\n'
                       + vgg19.missing_weights_message(None))
    terms['perceptual'] = perceptual_weight * perceptual_loss(
        vgg_params, vgg_mode, gray, outputs['ab_pred'], ab, dtype, remat, cpu_kernels)
  if ab_l1_weight > 0:
    terms['ab_l1'] = ab_l1_weight * jnp.mean(jnp.abs(outputs['ab_pred'] - ab))
  return sum(terms.values()), terms
