"""disco-export: the jax.export artifact and the jax2tf SavedModel compute what the Python model
computes (k-means anchors included), at batch 1 and 3 of one artifact (a symbolic batch).

Tolerance 1e-5 on ab / 110: the same float32 graph compiled by the same XLA:CPU, so only the
fusion choices of separate compilations differ (measured 9e-8); a different anchor choice would
move whole superpixels by far more.
"""
import json

import jax
import numpy as np
import pytest

from disco_jax.inference import colorize, export
from disco_jax.models import disco
from disco_jax.weights import convert

TINY = dict(spix_width=4, backbone_width=8, refine_width=8, d_model=16, num_layers=2, num_heads=2,
            ffn_dim=32, num_anchors=3)
SIZE = 32
TOL = 1e-5


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  model = disco.DISCO(**TINY)
  convert.save_variables(str(root / 'tiny.msgpack'), disco.init_variables(model, 0))
  code = export.main(['--weights', str(root / 'tiny.msgpack'), '--model', json.dumps(TINY),
                      '--out', str(root / 'out'), '--size', str(SIZE), '--anchors', '4'])
  assert code == 0
  variables = convert.load_variables(root / 'tiny.msgpack')
  return root / 'out', model.clone(num_anchors=4), variables


def _gray(batch):
  return np.asarray(jax.random.uniform(jax.random.key(batch), (batch, SIZE, SIZE, 1),
                                       minval=-1.0, maxval=1.0))


def test_signature_file(exported):
  out, _, _ = exported
  signature = json.loads((out / 'signature.json').read_text())
  assert signature['size'] == SIZE and signature['num_anchors'] == 4
  assert set(signature['platforms']) == {'cpu', 'cuda', 'tpu'}


def test_jax_export_equals_the_model(exported):
  out, model, variables = exported
  call = export.load_jax(out / export.JAX_FILE)  # deserialized: no model code involved
  python = jax.jit(lambda g, s: colorize.automatic_ab(model, variables, g, jax.random.key(s)))
  for batch in (1, 3):
    for seed in (130, 7):
      got = np.asarray(call(_gray(batch), np.int32(seed)))
      assert got.shape == (batch, SIZE, SIZE, 2)
      np.testing.assert_allclose(got, python(_gray(batch), seed), atol=TOL, rtol=0)


def test_saved_model_equals_the_model(exported):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out, model, variables = exported
  serve = tf.saved_model.load(str(out / export.SAVED_MODEL)).signatures['serving_default']
  python = jax.jit(lambda g, s: colorize.automatic_ab(model, variables, g, jax.random.key(s)))
  for batch in (1, 3):
    got = serve(gray=tf.constant(_gray(batch)), seed=tf.constant(130, tf.int32))['ab'].numpy()
    np.testing.assert_allclose(got, python(_gray(batch), 130), atol=TOL, rtol=0)
