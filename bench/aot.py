"""Ahead-of-time compiles of the training step and the inference function for a TPU topology, on a
host without a TPU (libtpu from requirements-tpu.txt): per-chip FLOPs, HBM traffic and HBM plan.

  python bench/aot.py --topology v5e:2x2 --batch 96 --dtype bfloat16
  python bench/aot.py --topology v4:2x2x1 --batch 96 --remat --fsdp 2
  python bench/aot.py --topology v5e:2x4 --slices 2 --batch 192 --fsdp 8
  python bench/aot.py --topology v5e:2x2 --batch 8 --size 64 --variant tiny --cases train

One JSON line per case (train: the step train.py runs, VGG19 perceptual term included, random VGG19
weights; infer: automatic colorization, k-means anchors and the modeler's colours; kmeans: the
anchors alone, whose `scatter` count shows how cluster sums compile). The roofline
takes the step as max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) per chip, from XLA's
cost analysis of the compiled program: `mfu_ceiling` is the best model FLOP utilisation that HBM
traffic leaves, `hfu_ceiling` the same with the FLOPs that remat recomputes counted (the two
differ only with --remat). Peak FLOP/s is the chip's bf16 figure, float32 steps included.
"""
import argparse
import copy
import json
import os
import re
import sys
import time

# Before jax loads libtpu: no probing for TPU hardware or a metadata server on this host.
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
# libtpu takes /tmp/libtpu_lockfile for the one process that may own the chips; a compile-only
# process owns none, and several may run at once (the test beside a bench).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Per chip: peak bf16 FLOP/s, HBM bytes, HBM bytes/s, chips per host (x, y, z) at most. From the
# Cloud TPU system architecture pages: https://cloud.google.com/tpu/docs/v4,
# https://cloud.google.com/tpu/docs/v5e, https://cloud.google.com/tpu/docs/v5p,
# https://cloud.google.com/tpu/docs/v6e (HBM "GB" there are GiB: 16, 32, 95, 32).
# `config`: libtpu's chip configuration. v4's 'default' makes each of its two TensorCores a device;
# TPU VMs run it as one megacore device per chip, as v5p's 'default' already is (and mesh_utils
# refuses anything else on v4).
CHIPS = {
    'v4': dict(peak_flops=275e12, hbm_bytes=32 * 2**30, hbm_bandwidth=1200e9, host=(2, 2, 1),
               config='megacore'),
    'v5e': dict(peak_flops=197e12, hbm_bytes=16 * 2**30, hbm_bandwidth=819e9, host=(2, 4, 1)),
    'v5p': dict(peak_flops=459e12, hbm_bytes=95 * 2**30, hbm_bandwidth=2765e9, host=(2, 2, 1)),
    'v6e': dict(peak_flops=918e12, hbm_bytes=32 * 2**30, hbm_bandwidth=1640e9, host=(2, 4, 1)),
}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter')


def topology_devices(topology: str, slices: int = 1):
  """'v5e:2x2' -> the TPU devices of `slices` such slices, described by libtpu (no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip, _, shape = topology.partition(':')
  if chip not in CHIPS or not re.fullmatch(r'\d+(x\d+){1,2}', shape):
    raise SystemExit(f'--topology {topology!r}: expected CHIP:AxB[xC] with CHIP one of '
                     f'{sorted(CHIPS)}, e.g. v5e:2x2 or v4:2x2x1')
  dims = [int(d) for d in shape.split('x')] + [1]
  host = tuple(min(d, h) for d, h in zip(dims, CHIPS[chip]['host']))
  return topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                      chip_config_name=CHIPS[chip].get('config', 'default'),
                                      chips_per_host_bounds=host, num_slices=slices).devices


def collective_counts(hlo_text: str) -> dict:
  """Instructions of each collective kind in compiled HLO text (async '-start' halves counted)."""
  return {kind.replace('-', '_'): len(re.findall(rf'\s{kind}(?:-start)?\(', hlo_text))
          for kind in COLLECTIVES}


def _config(args):
  from configs import disco as disco_configs  # pylint: disable=g-import-not-at-top
  config = disco_configs.get_config(args.variant)
  config.input.image_size = args.size
  config.input.global_batch_size = args.batch
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.model.cpu_kernels = args.cpu_kernels
  config.mesh.fsdp = args.fsdp
  config.loss.perceptual_weight = 5.0  # the released recipe's term, whatever the variant
  return config


def _abstract(tree, shardings):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _train(config, mesh, cpu_kernels):
  """(jitted step, its abstract arguments): trainer.make_train_step over a real DiscoTask."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from disco_jax.models import vgg  # pylint: disable=g-import-not-at-top
  from disco_jax.training import optim, sharding, tasks, trainer  # pylint: disable=g-import-not-at-top
  vgg_params = jax.eval_shape(lambda: vgg.VGG19Features().init(
      jax.random.key(1), jnp.zeros((1, 32, 32, 3)))['params'])
  task = tasks.DiscoTask(config, vgg_weights=(None, 'torch'), cpu_kernels=cpu_kernels,
                         platform='tpu')
  schedule = optim.learning_rate_schedule(config.optim, 1000)
  tx = optim.make_optimizer(config.optim, schedule, frozen=task.frozen)

  def step(state, batch, vgg_params):
    # VGG19's weights as an argument, not closed over: XLA would embed them as constants, outside
    # the HBM plan of memory_analysis. train.py closes over them; the compiled step is the same.
    with_vgg = copy.copy(task)
    with_vgg.vgg_params = vgg_params
    return trainer.make_train_step(with_vgg, tx, schedule, config.seed,
                                   config.optim.max_update_ratio)(state, batch)

  abstract = jax.eval_shape(lambda: trainer.create_state(task, tx, config.seed))
  state_shard = sharding.tree_shardings(mesh, abstract)
  batch_shard, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  size, n = config.input.image_size, config.input.global_batch_size
  batch = {'gray': jax.ShapeDtypeStruct((n, size, size, 1), jnp.float32, sharding=batch_shard),
           'ab': jax.ShapeDtypeStruct((n, size, size, 2), jnp.float32, sharding=batch_shard)}
  vgg_abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), vgg_params)
  jitted = jax.jit(step, out_shardings=(state_shard, replicated), donate_argnums=(0,))
  return jitted, (_abstract(abstract, state_shard), batch, vgg_abstract)


def _kmeans(config, mesh, cpu_kernels):
  """(jitted k-means anchors, their abstract arguments): the inference's clustering of the
  modeler's token features, alone (its op kinds are lost in the full program)."""
  del cpu_kernels
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from disco_jax.ops import anchors, superpixel  # pylint: disable=g-import-not-at-top
  from disco_jax.training import sharding  # pylint: disable=g-import-not-at-top
  batch_shard, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  n, side = config.input.global_batch_size, config.input.image_size // superpixel.STRIDE
  feats = jax.ShapeDtypeStruct((n, side, side, config.model.d_model), jnp.float32,
                               sharding=batch_shard)
  sizes = jax.ShapeDtypeStruct((n, side, side), jnp.float32, sharding=batch_shard)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  fn = jax.jit(lambda k, f, s: anchors.kmeans_anchors(k, f, s, config.model.num_anchors),
               out_shardings=batch_shard)
  return fn, (key, feats, sizes)


def _infer(config, mesh, cpu_kernels):
  """(jitted automatic colorization, its abstract arguments), as bench/run.py's infer cases."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from disco_jax.models import disco  # pylint: disable=g-import-not-at-top
  from disco_jax.training import sharding  # pylint: disable=g-import-not-at-top
  model = disco.from_config(config.model, cpu_kernels, 'tpu')
  variables = jax.eval_shape(lambda: disco.init_variables(model))
  batch_shard, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  size, n = config.input.image_size, config.input.global_batch_size
  gray = jax.ShapeDtypeStruct((n, size, size, 1), jnp.float32, sharding=batch_shard)
  ab = jax.ShapeDtypeStruct((n, size, size, 2), jnp.float32, sharding=batch_shard)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  fwd = jax.jit(lambda v, g, a, k: model.apply(v, g, a, test_mode=True, colours='mode',
                                               rngs={'anchors': k})['ab_pred'],
                out_shardings=batch_shard)
  shardings = jax.tree_util.tree_map(lambda _: replicated, variables)
  return fwd, (_abstract(variables, shardings), gray, ab, key)


BUILDERS = {'train': _train, 'infer': _infer, 'kmeans': _kmeans}  # case -> (jitted, arguments)


def recompute_share(case, args, chips):
  """1 - (FLOPs without remat) / (FLOPs with it) of one chip's share of the step: the part of a
  remat step's compiled FLOPs that recomputes the forward, which model FLOP utilisation must not
  count. From the unoptimised programs (lowering only, no compile) on one CPU device at the
  per-chip batch, where XLA's cost analysis is available."""
  import jax  # pylint: disable=g-import-not-at-top
  from disco_jax.training import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(1, jax.devices('cpu')[:1])
  flops = []
  for remat in (False, True):
    share = argparse.Namespace(**{**vars(args), 'batch': args.batch // chips, 'remat': remat,
                                  'fsdp': 1, 'cpu_kernels': 'off'})
    cost = BUILDERS[case](_config(share), mesh, False)
    cost = cost[0].lower(*cost[1]).cost_analysis()
    flops.append((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  return 1 - flops[0] / flops[1]


def run_case(case, args, devices):
  """The JSON record of one compiled case."""
  from disco_jax.training import compiled_stats, sharding, tasks  # pylint: disable=g-import-not-at-top
  config = _config(args)
  mesh = sharding.make_mesh(args.fsdp, devices)
  cpu_kernels = tasks.uses_cpu_kernels(config, mesh.devices.flat)
  jitted, abstract_args = BUILDERS[case](config, mesh, cpu_kernels)
  t0 = time.perf_counter()
  compiled = jitted.lower(*abstract_args).compile()
  compile_s = time.perf_counter() - t0
  stats = compiled_stats.compiled_stats(compiled)
  hlo = compiled.as_text()
  if args.hlo:
    with open(f'{args.hlo}.{case}.hlo', 'w') as f:  # to read where the bytes go
      f.write(hlo)
  chip = CHIPS[args.topology.split(':')[0]]
  chips = len(devices)
  flops_s = stats['flops'] / chip['peak_flops']
  bytes_s = stats['bytes_accessed'] / chip['hbm_bandwidth']
  step_s = max(flops_s, bytes_s)
  recompute = recompute_share(case, args, chips) if args.remat else 0.0
  model_flops_s = flops_s * (1 - recompute)
  return dict(
      case=case, topology=args.topology, slices=args.slices, chips=chips, batch=args.batch,
      size=args.size, variant=args.variant or 'released', dtype=args.dtype, remat=args.remat,
      fsdp=args.fsdp, cpu_kernels=args.cpu_kernels, cpu_kernels_used=cpu_kernels,
      flops_per_chip=stats['flops'], bytes_accessed_per_chip=stats['bytes_accessed'],
      argument_bytes_per_chip=stats['argument_bytes'], output_bytes_per_chip=stats['output_bytes'],
      alias_bytes_per_chip=stats['alias_bytes'], temp_bytes_per_chip=stats['temp_bytes'],
      peak_bytes_per_chip=stats['peak_bytes'], hbm_bytes_per_chip=chip['hbm_bytes'],
      fits=stats['peak_bytes'] <= chip['hbm_bytes'],
      headroom=1 - stats['peak_bytes'] / chip['hbm_bytes'],
      **collective_counts(hlo), scatter=len(re.findall(r'\sscatter\(', hlo)),
      compile_s=compile_s,
      flops_s=flops_s, bytes_s=bytes_s, roofline_step_s=step_s,
      images_per_s_per_chip=args.batch / chips / step_s if step_s else 0.0,
      recompute_share=recompute, model_flops_per_chip=model_flops_s * chip['peak_flops'],
      hfu_ceiling=flops_s / step_s if step_s else 0.0,
      mfu_ceiling=model_flops_s / step_s if step_s else 0.0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--topology', default='v5e:2x2', help='CHIP:AxB[xC], CHIP in ' +
                      ', '.join(sorted(CHIPS)))
  parser.add_argument('--batch', type=int, default=96, help='global batch (all chips)')
  parser.add_argument('--size', type=int, default=256, help='image side in pixels')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--remat', action='store_true', help='config.model.remat')
  parser.add_argument('--fsdp', type=int, default=1, help='config.mesh.fsdp')
  parser.add_argument('--slices', type=int, default=1,
                      help="slices of the topology joined by DCN ('data' spans them)")
  parser.add_argument('--cpu-kernels', default='auto', choices=('auto', 'on', 'off'),
                      help="config.model.cpu_kernels ('auto' is off on TPUs)")
  parser.add_argument('--variant', default='', help="configs/disco.py variant ('tiny' for tests)")
  parser.add_argument('--hlo', default='', help='write each compiled program to HLO.CASE.hlo')
  parser.add_argument('--cases', default='train,infer',
                      help='comma-separated: train, infer, kmeans (the anchors alone)')
  args = parser.parse_args()
  cases = [c for c in args.cases.split(',') if c]
  if set(cases) - set(BUILDERS):
    parser.error(f'--cases {args.cases!r}: choose from {", ".join(BUILDERS)}')
  devices = topology_devices(args.topology, args.slices)
  if args.batch % len(devices):
    parser.error(f'--batch {args.batch} must be a multiple of the {len(devices)} chips of '
                 f'{args.topology}')
  for case in cases:
    print(json.dumps(run_case(case, args, devices)), flush=True)


if __name__ == '__main__':
  main()
