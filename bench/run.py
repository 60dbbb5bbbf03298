"""The speed benchmarks: one command, a table on stdout and the figures as JSON.

  python bench/run.py                          # every case, JSON to bench/results.json
  python bench/run.py --cases infer_256_b1,train_256_b2 --runs 5
  python bench/run.py --cases train_256_b2 --dtype bfloat16 --remat

Cases (full released model, weights freshly initialised: times do not depend on their values):
  matmul        float32 4096x4096 matrix product: the machine's measured peak
  infer_S_bB    automatic colorization at S x S, batch B (k-means anchors, mode colours)
  train_S_bB    one training step at S x S, batch B: GT k-means anchors, both CE heads,
                5 x VGG19 perceptual loss, backward, Adam (the released recipe)
  pipeline      the input pipeline alone (JPEG decode, squash to 256, Lab): images per second
  colorize_Nmp  the colorize command on one N-megapixel grey PNG (square, uniform: a small file),
                work size 64, a tiny random model: reading, compiling and writing included;
                what full-resolution output costs in time and memory

Each case runs in a fresh process, so that its peak RSS is its own: `RSS GB` is the whole
process's peak (imports and compilation included), `run GB` the peak while the compiled calls ran.
Times are the median, min and max over --runs calls after one warm-up call; FLOPs are XLA's cost
analysis of the compiled call.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = ('matmul', 'infer_256_b1', 'infer_256_b8', 'infer_512_b1', 'train_256_b2',
         'train_256_b4', 'pipeline', 'colorize_144mp')
DEFAULT_RUNS = {'matmul': 20, 'infer': 5, 'train': 5, 'pipeline': 3, 'colorize': 1}


def _peak_rss_gb():
  """This process's peak resident memory since start or the last `_reset_peak_rss` (VmHWM)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024 / 1e9
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _reset_peak_rss():
  """Linux: restart the VmHWM count, so that the calls' peak is told apart from compilation's."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass


def _timed(fn, runs):
  """fn() after one warm-up call: median, min and max seconds over `runs` calls, and the peak RSS
  while they ran (warm-up included; compilation and set-up excluded)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from disco_jax.training import compiled_stats  # pylint: disable=g-import-not-at-top
  setup_rss_gb = _peak_rss_gb()
  compiled_stats.release_freed_memory()  # as the trainer does after compiling
  _reset_peak_rss()
  fn()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  run_rss_gb = _peak_rss_gb()
  return dict(median_s=float(np.median(times)), min_s=min(times), max_s=max(times), runs=runs,
              run_rss_gb=run_rss_gb, peak_rss_gb=max(setup_rss_gb, run_rss_gb))


def _compile(jitted, *args):
  from disco_jax.training import compiled_stats  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, dict(compile_s=time.perf_counter() - t0,
                        **compiled_stats.compiled_stats(compiled))


def bench_matmul(runs, **_):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = 4096
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  compiled, stats = _compile(jax.jit(lambda a, b: a @ b), a, a)
  result = dict(stats, **_timed(lambda: jax.block_until_ready(compiled(a, a)), runs))
  result['flops'] = 2.0 * n ** 3
  return result


def _model(dtype, remat):
  import jax  # pylint: disable=g-import-not-at-top
  from disco_jax.kernels import cpu  # pylint: disable=g-import-not-at-top
  from disco_jax.models import disco  # pylint: disable=g-import-not-at-top
  platform = jax.devices()[0].platform
  return disco.DISCO(dtype=dtype, remat=remat, cpu_kernels=cpu.wanted('auto', jax.devices()),
                     matmul_precision=disco.matmul_precision('auto', platform))


def bench_infer(runs, size, batch, dtype='float32', remat=False, **_):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from disco_jax.models import disco  # pylint: disable=g-import-not-at-top
  model = _model(jnp.dtype(dtype), remat)
  variables = disco.init_variables(model)
  gray = jax.random.uniform(jax.random.key(0), (batch, size, size, 1)) * 2 - 1
  ab = jnp.zeros((batch, size, size, 2))
  fwd = jax.jit(lambda v, g, a, k: model.apply(v, g, a, test_mode=True, colours='mode',
                                               rngs={'anchors': k})['ab_pred'])
  key = jax.random.key(130)
  compiled, stats = _compile(fwd, variables, gray, ab, key)
  return dict(stats, **_timed(lambda: jax.block_until_ready(compiled(variables, gray, ab, key)),
                              runs))


def _train_config(size, batch, dtype, remat):
  from configs import disco as disco_configs  # pylint: disable=g-import-not-at-top
  config = disco_configs.get_config()
  config.input.image_size = size
  config.input.global_batch_size = batch
  config.model.dtype = dtype
  config.model.remat = remat
  return config


def bench_train(runs, size, batch, dtype='float32', remat=False, **_):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from disco_jax.models import vgg  # pylint: disable=g-import-not-at-top
  from disco_jax.training import optim, sharding, tasks, trainer  # pylint: disable=g-import-not-at-top
  config = _train_config(size, batch, dtype, remat)
  vgg_params = jax.jit(lambda: vgg.VGG19Features().init(
      jax.random.key(1), jnp.zeros((1, 32, 32, 3)))['params'])()
  mesh = sharding.make_mesh(1)
  task = tasks.DiscoTask(config, vgg_weights=(vgg_params, 'torch'),
                         cpu_kernels=tasks.uses_cpu_kernels(config, mesh.devices.flat),
                         platform=mesh.devices.flat[0].platform)
  schedule = optim.learning_rate_schedule(config.optim, 1000)
  tx = optim.make_optimizer(config.optim, schedule, frozen=task.frozen)
  abstract = jax.eval_shape(lambda: trainer.create_state(task, tx, 0))
  state_shard = sharding.tree_shardings(mesh, abstract)
  batch_shard = sharding.batch_sharding(mesh)
  state = jax.jit(lambda: trainer.create_state(task, tx, 0), out_shardings=state_shard)()
  rgb = jax.random.uniform(jax.random.key(0), (batch, size, size, 3))
  data = {'gray': jnp.mean(rgb, -1, keepdims=True) * 2 - 1, 'ab': (rgb[..., :2] - 0.5) * 0.6}
  # The step train.py runs, divergence check included.
  step = jax.jit(trainer.make_train_step(task, tx, schedule, 0, config.optim.max_update_ratio),
                 in_shardings=(state_shard, batch_shard), donate_argnums=(0,))
  compiled, stats = _compile(step, state, data)
  holder = [state]

  def one():
    holder[0], metrics = compiled(holder[0], data)
    jax.block_until_ready(metrics['loss'])

  result = dict(stats, **_timed(one, runs))
  result['images_per_s'] = batch / result['median_s']
  return result


def _write_photos(folder, count, seed=0):
  """`count` JPEGs of ImageNet's typical size (500x375), smooth colour fields plus texture."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:375, 0:500] / 100.0
  for i in range(count):
    f = rng.uniform(0.5, 3.0, (3, 2))
    img = np.stack([np.sin(f[c, 0] * yy + f[c, 1] * xx + rng.uniform(0, 6)) for c in range(3)], -1)
    img = (img * 90 + 128 + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(folder, f'{i:04d}.jpg'), quality=90)


def bench_pipeline(runs, size=256, batch=2, **_):
  from disco_jax.data import folder as folder_lib, pipeline  # pylint: disable=g-import-not-at-top
  count = 256
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, 'photos')
    os.makedirs(folder)
    _write_photos(folder, count)
    config = _train_config(size, batch, 'float32', False)
    config.input.update(dataset='folder', folder=folder, data_dir=os.path.join(tmp, 'tfds'),
                        shuffle_buffer=count)
    folder_lib.prepare_folder(folder, config.input.data_dir)
    batches = count // batch

    def one_epoch():
      for _ in pipeline.local_train_dataset(config).take(batches).as_numpy_iterator():
        pass

    result = _timed(one_epoch, runs)
  result['images'] = batches * batch
  result['images_per_s'] = result['images'] / result['median_s']
  return result


def bench_colorize(runs, megapixels, **_):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from disco_jax.inference import colorize  # pylint: disable=g-import-not-at-top
  from disco_jax.models import disco  # pylint: disable=g-import-not-at-top
  from disco_jax.weights import convert  # pylint: disable=g-import-not-at-top
  side = round((megapixels * 1e6) ** 0.5)
  sizes = dict(spix_width=4, backbone_width=8, refine_width=8, d_model=16, num_layers=2,
               num_heads=2, ffn_dim=32, num_anchors=3)
  with tempfile.TemporaryDirectory() as tmp:
    photo, weights = os.path.join(tmp, 'grey.png'), os.path.join(tmp, 'tiny.msgpack')
    Image.fromarray(np.full((side, side), 128, np.uint8)).save(photo)
    convert.save_variables(weights, disco.init_variables(disco.DISCO(**sizes), 0))
    argv = ['--variables', weights, '--model', json.dumps(sizes), '--size', '64', '--input', photo,
            '--output', os.path.join(tmp, 'out')]
    times, cpu = [], time.process_time()
    for _ in range(runs):  # the first run compiles too (jit's cache serves later ones)
      t0 = time.perf_counter()
      if colorize.main(argv):
        raise RuntimeError(f'colorize {argv} failed')
      times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu) / runs
    file_mb = os.path.getsize(photo) / 1e6
  return dict(median_s=float(np.median(times)), min_s=min(times), max_s=max(times), runs=runs,
              peak_rss_gb=_peak_rss_gb(), pixels=side * side, file_mb=file_mb, cpu_s=cpu,
              load_avg=os.getloadavg()[0])


def run_case(name, runs, dtype, remat):
  """The figures of one case, in this process."""
  kind = name.split('_')[0]
  runs = runs or DEFAULT_RUNS[kind]
  if kind == 'matmul':
    result = bench_matmul(runs)
  elif kind == 'pipeline':
    result = bench_pipeline(runs)
  elif kind == 'colorize':
    result = bench_colorize(runs, int(name.split('_')[1][:-len('mp')]))
  else:
    _, size, batch = name.split('_')
    if kind == 'train':
      from disco_jax.training import compiled_stats  # pylint: disable=g-import-not-at-top
      compiled_stats.schedule_for_memory()  # as train.py does, before jax computes anything
    fn = bench_infer if kind == 'infer' else bench_train
    result = fn(runs, int(size), int(batch[1:]), dtype=dtype, remat=remat)
  import jax  # pylint: disable=g-import-not-at-top
  result.update(case=name, dtype=dtype, remat=remat, device=jax.devices()[0].device_kind,
                device_count=jax.device_count())
  result['peak_rss_gb'] = max(result['peak_rss_gb'], _peak_rss_gb())
  return result


def _row(r, peak):
  gflops = r.get('flops', 0) / 1e9
  rate = gflops / r['median_s'] if gflops else 0.0
  frac = f'{rate / peak:.0%}' if peak and rate and r['case'] != 'matmul' else ''
  extra = f"{r['images_per_s']:.1f} img/s" if 'images_per_s' in r else ''
  if 'pixels' in r:
    extra = (f"{r['pixels'] / 1e6:.0f} Mpx, a {r['file_mb'] * 1e3:.0f} KB file; CPU "
             f"{r['cpu_s']:.1f} s (all threads), load {r['load_avg']:.1f}")
  return (f"{r['case']:<14}{r['median_s']:>9.3f}{r['min_s']:>9.3f}{r['max_s']:>9.3f}"
          f"{r.get('compile_s', 0):>9.1f}{gflops:>9.1f}{rate:>8.0f} {frac:>6}"
          f"{r['peak_rss_gb']:>8.2f}{r.get('run_rss_gb', 0):>8.2f}  {extra}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default=','.join(CASES), help=f'comma-separated, from {CASES}')
  parser.add_argument('--runs', type=int, default=0, help='timed calls per case (0: default)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--remat', action='store_true', help='config.model.remat in train cases')
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results.json'))
  parser.add_argument('--case', help=argparse.SUPPRESS)  # internal: run one case, print JSON
  args = parser.parse_args()
  if args.case:
    print('RESULT ' + json.dumps(run_case(args.case, args.runs, args.dtype, args.remat)))
    return
  cases = [c for c in args.cases.split(',') if c]
  unknown = [c for c in cases if c not in CASES and not re.fullmatch(r'colorize_[0-9]+mp', c)]
  if unknown:
    parser.error(f'unknown cases {unknown}; choose from {CASES}')
  results = []
  print(f"{'case':<14}{'median s':>9}{'min s':>9}{'max s':>9}{'compile':>9}{'GFLOP':>9}"
        f"{'GFLOP/s':>8} {'peak%':>6}{'RSS GB':>8}{'run GB':>8}", flush=True)
  peak = 0.0
  for case in cases:
    cmd = [sys.executable, os.path.abspath(__file__), '--case', case, '--runs', str(args.runs),
           '--dtype', args.dtype] + (['--remat'] if args.remat else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      print(f'{case:<14}failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}', flush=True)
      continue
    result = json.loads(lines[-1][len('RESULT '):])
    if case == 'matmul':
      peak = result['flops'] / 1e9 / result['median_s']
    results.append(result)
    print(_row(result, peak), flush=True)
  by_case = {r['case']: r for r in results}
  if 'pipeline' in by_case and 'train_256_b2' in by_case:
    ratio = by_case['pipeline']['images_per_s'] / by_case['train_256_b2']['images_per_s']
    print(f'input pipeline: {ratio:.0f}x the images per second that train_256_b2 consumes')
  with open(args.out, 'w') as f:
    json.dump({'matmul_peak_gflops': peak, 'results': results}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
