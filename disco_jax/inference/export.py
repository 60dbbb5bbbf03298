"""Export a colorizer for serving: a serialized `jax.export` artifact and a TF SavedModel.

  disco-export --workdir ckpt/disco --out exported/ [--size 256] [--anchors 8]
  disco-export --weights disco-beta.pth.tar --out exported/     # or a converted .msgpack
  python -m disco_jax.inference.export ...                       # the same

Both compute `colorize.automatic_ab` with the weights inside: gray `(B, S, S, 1)` float32 =
(L - 50) / 50 at the work size S, and an int32 seed for the k-means anchors -> ab `(B, S, S, 2)`
float32 = ab / 110. B is symbolic; S and the anchor count are fixed per artifact. Resizing to S,
Lab conversion and joining the ab to the full-size L are the caller's (see `colorize`).

  OUT/disco.jax_export   jax.export.deserialize(bytearray(data)).call(gray, seed): StableHLO, no
                         model code needed; lowered for --platforms (default cpu, cuda and tpu)
  OUT/saved_model/       jax2tf, signature 'serving_default': {'gray', 'seed'} -> {'ab'}
  OUT/signature.json     the above, with the work size, anchor count and source
"""
import argparse
import json
import os
import sys
from typing import Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.inference import colorize

JAX_FILE = 'disco.jax_export'
SAVED_MODEL = 'saved_model'
PLATFORMS = ('cpu', 'cuda', 'tpu')


def serving_fn(model, variables):
  """(variables, gray `(B, S, S, 1)`, seed `()` int32) -> ab `(B, S, S, 2)`: what is exported."""
  return lambda v, gray, seed: colorize.automatic_ab(model, v, gray, jax.random.key(seed))


def input_specs(size: int):
  """The artifact's inputs: gray with a symbolic batch `b`, and the seed."""
  (b,) = jax.export.symbolic_shape('b')
  return (jax.ShapeDtypeStruct((b, size, size, 1), jnp.float32),
          jax.ShapeDtypeStruct((), jnp.int32))


def export_jax(model, variables, size: int, platforms: Sequence[str] = PLATFORMS):
  """A `jax.export.Exported` of the automatic colorization with `variables` as constants."""
  fn = serving_fn(model, variables)
  weights = jax.tree_util.tree_map(jnp.asarray, variables)
  return jax.export.export(jax.jit(lambda gray, seed: fn(weights, gray, seed)),
                           platforms=tuple(platforms))(*input_specs(size))


def save_tf(model, variables, size: int, path, platforms: Sequence[str] = ('cpu',)):
  """A TF SavedModel at `path` (jax2tf, native serialization) whose weights are tf.Variables."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')  # JAX needs the accelerator's memory
  except RuntimeError:
    pass  # TF was already initialised
  converted = jax2tf.convert(serving_fn(model, variables),
                             polymorphic_shapes=[None, f'(b, {size}, {size}, 1)', None],
                             native_serialization_platforms=tuple(platforms),
                             with_gradient=False)
  module = tf.Module()
  module.weights = tf.nest.map_structure(lambda x: tf.Variable(np.asarray(x), trainable=False),
                                         jax.device_get(variables))

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, size, size, 1], tf.float32, name='gray'),
      tf.TensorSpec([], tf.int32, name='seed')])
  def serve(gray, seed):
    return {'ab': converted(module.weights, gray, seed)}

  module.serve = serve
  tf.saved_model.save(module, os.fspath(path), signatures={'serving_default': serve})


def load_jax(path):
  """The exported function of a `disco.jax_export` file: `call(gray, seed) -> ab`."""
  return jax.export.deserialize(bytearray(epath.Path(path).read_bytes())).call


def export_all(model, variables, size: int, out, source: str,
               platforms: Sequence[str] = PLATFORMS):
  """Writes OUT/disco.jax_export, OUT/saved_model/ and OUT/signature.json (see the docstring)."""
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / JAX_FILE).write_bytes(export_jax(model, variables, size, platforms).serialize())
  # jax2tf lowers for the TF runtimes that serve it: the ones of --platforms that TF has.
  save_tf(model, variables, size, out / SAVED_MODEL, [p for p in platforms if p != 'cuda'] or
          ['cpu'])
  signature = {
      'inputs': {'gray': f'float32 (batch, {size}, {size}, 1): (L - 50) / 50 at the work size',
                 'seed': 'int32 (): k-means anchor seed (130: the official inference)'},
      'outputs': {'ab': f'float32 (batch, {size}, {size}, 2): ab / 110'},
      'size': size, 'num_anchors': model.num_anchors, 'platforms': list(platforms),
      'source': source, JAX_FILE: 'jax.export.deserialize(bytearray(data)).call(gray, seed)',
      SAVED_MODEL: "tf.saved_model.load(dir).signatures['serving_default'](gray=..., seed=...)"}
  (out / 'signature.json').write_text(json.dumps(signature, indent=2))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='disco-export', description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--workdir', help='training run folder (its latest checkpoint)')
  src.add_argument('--weights', help='a converted .msgpack or an official .pth/.pth.tar')
  p.add_argument('--model', help='with --weights: DISCO fields that differ from the released '
                 'sizes, as JSON')
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--size', type=int, default=256, help='work size, a multiple of 16')
  p.add_argument('--anchors', type=int, help='anchor count of this artifact (default: the '
                 'model\'s)')
  p.add_argument('--platforms', default=','.join(PLATFORMS),
                 help='platforms the jax.export artifact is lowered for, comma-separated')
  args = p.parse_args(argv)
  if args.size < 16 or args.size % 16:
    p.error(f'--size {args.size}: must be a positive multiple of 16')
  try:
    if args.workdir:
      if args.model:
        p.error('--model goes with --weights; a --workdir carries its own model sizes')
      from disco_jax.models import disco  # pylint: disable=g-import-not-at-top
      from disco_jax.training import trainer  # pylint: disable=g-import-not-at-top
      config, variables = trainer.load_trained(args.workdir)
      model = disco.from_config(config.model)
    else:
      model, variables = colorize.load_weights(args.weights,
                                               json.loads(args.model) if args.model else None)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.anchors is not None:
    model = model.clone(num_anchors=args.anchors)
  export_all(model, variables, args.size, args.out, args.workdir or args.weights,
             args.platforms.split(','))
  print(f'wrote {args.out}/{JAX_FILE}, {args.out}/{SAVED_MODEL}/ and {args.out}/signature.json')
  return 0


if __name__ == '__main__':
  sys.exit(main())
