"""What XLA says about a compiled function, its FLOPs and its memory (trainer log, benchmarks), and
the two settings that keep the training process's memory down on CPU."""
import ctypes
import ctypes.util
import os

_SCHEDULER_FLAG = 'xla_cpu_enable_concurrency_optimized_scheduler'


def compiled_stats(compiled) -> dict:
  """FLOPs, bytes accessed and buffer sizes of a `jax.stages.Compiled` (per device, as XLA counts).

  Keys: flops, bytes_accessed, argument_bytes, output_bytes, alias_bytes (outputs written over
  donated arguments), temp_bytes (intermediates), peak_bytes (arguments + outputs - aliases +
  temporaries: the live set XLA planned). A backend that reports nothing gives zeros.
  """
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  stats = {'flops': float(cost.get('flops', 0.0)),
           'bytes_accessed': float(cost.get('bytes accessed', 0.0))}
  memory = compiled.memory_analysis()
  for key in ('argument', 'output', 'alias', 'temp'):
    stats[f'{key}_bytes'] = int(getattr(memory, f'{key}_size_in_bytes', 0)) if memory else 0
  stats['peak_bytes'] = (stats['argument_bytes'] + stats['output_bytes'] - stats['alias_bytes']
                         + stats['temp_bytes'])
  return stats


def release_freed_memory():
  """Hands the heap that compilation freed back to the OS (glibc's malloc_trim; elsewhere a no-op).

  Compiling the full training step leaves freed but resident heap that glibc keeps; trimming once
  after compiling lowers the training process's peak RSS (bench/NOTES.md has the figures).
  """
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name) if name else None
  except OSError:
    libc = None
  if libc is not None and hasattr(libc, 'malloc_trim'):
    libc.malloc_trim(0)


def schedule_for_memory():
  """Asks XLA:CPU to order each computation for a low peak of memory rather than for concurrency.

  Call it before jax's first computation: XLA reads XLA_FLAGS once, when it starts the CPU
  backend. The training step then plans far fewer temporaries, in the same time within noise
  (bench/NOTES.md). Other backends ignore the flag; a value the user put in XLA_FLAGS wins.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if _SCHEDULER_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --{_SCHEDULER_FLAG}=false'.strip()


def describe(stats: dict) -> str:
  """One line for a log: 'GFLOP 255.1, accessed 12.3 GB; memory arguments 0.2 GB, ...'."""
  gb = lambda n: f'{n / 1e9:.2f} GB'
  return (f"{stats['flops'] / 1e9:.1f} GFLOP, {gb(stats['bytes_accessed'])} accessed; memory: "
          f"arguments {gb(stats['argument_bytes'])}, outputs {gb(stats['output_bytes'])} "
          f"({gb(stats['alias_bytes'])} donated), temporaries {gb(stats['temp_bytes'])}, "
          f"planned peak {gb(stats['peak_bytes'])}")
