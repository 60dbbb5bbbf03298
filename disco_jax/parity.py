"""The comparison API against the official PyTorch model: every stage under the fixtures' names.

`tests/test_parity.py` and `tools/` use it with the fixtures of `shared/parity` (their README
defines the keys and layouts).
"""
from typing import Optional

import jax.numpy as jnp

from disco_jax.models import disco
from disco_jax.ops import colour
from disco_jax.training import losses


def forward_stages(variables, gray, ab, anchor_mask, anchor_label,
                   model: Optional[disco.DISCO] = None, colorfulness: float = 0.5):
  """Every stage of the eval-mode forward with given anchors, keyed as the parity fixtures.

  gray `(N, H, W, 1)`, ab `(N, H, W, 2)`, anchor_mask `(N, h, w)`, anchor_label `(N, h, w)` int.
  Returns arrays with the fixture keys and layouts (see `shared/parity/README.md`), the losses
  included: plain and class-rebalanced cross-entropy of both heads against `anchor_label`.
  """
  model = model or disco.DISCO()
  gray, ab = jnp.asarray(gray, jnp.float32), jnp.asarray(ab, jnp.float32)
  anchor_label = jnp.asarray(anchor_label, jnp.int32)
  enc = model.apply(variables, gray, ab, method=disco.DISCO.encode)
  dec = model.apply(variables, gray, enc, jnp.asarray(anchor_mask), anchor_label,
                    method=disco.DISCO.decode)
  out = dict(enc, **dec)
  out['pos'] = enc['pos']
  weights = jnp.asarray(colour.class_weights(colorfulness))[anchor_label]
  for head in ('modeler', 'generator'):
    ce = losses.cross_entropy(out[f'{head}_logits'], anchor_label)
    out[f'ce_{head}'] = jnp.mean(ce)
    out[f'wce_{head}'] = jnp.mean(weights * ce)
  return out
