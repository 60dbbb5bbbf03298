"""A local web page for colorizing photos and editing their anchors (`python -m disco_jax.app`).

  python -m disco_jax.app --workdir runs/demo/disco
  python -m disco_jax.app --weights disco.msgpack [--model '{"d_model": 16, ...}'] [--port 7860]

Served by the standard library's HTTP server on localhost; the page, its script and its style are
one local file, and nothing is sent anywhere.
"""
import argparse
import sys

from disco_jax.app import server
from disco_jax.inference import colorize


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m disco_jax.app', description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--workdir', help='training run folder (train.py --workdir)')
  src.add_argument('--weights', help='.msgpack of variables (python -m disco_jax.weights.convert)')
  p.add_argument('--model', help='DISCO fields for --weights as JSON or a .json file '
                 '(default: the released sizes)')
  p.add_argument('--port', type=int, default=7860, help='localhost port (0: any free one)')
  p.add_argument('--host', default='127.0.0.1',
                 help='address to listen on (the default keeps the page to this machine)')
  args = p.parse_args(argv)
  if args.model and args.workdir:
    p.error('--model goes with --weights; a --workdir carries its own model sizes')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    model, variables = colorize.load_model(argparse.Namespace(
        workdir=args.workdir, variables=args.weights, model=args.model, anchors=None))
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  server.serve(server.App(model, variables), args.port, args.host)
  return 0
