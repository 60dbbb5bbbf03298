"""Imports flow one way: ops/kernels <- models/data <- weights <- training <- evaluation/inference
<- parity/app <- the package root and cli <- entry points, tools and benchmarks.

Every module's imports are read (function-level ones included); a module may import its own
subpackage and any subpackage of a lower layer, never one of its own layer or above. Nothing may
use another module's private (`_name`) attributes.
"""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Layer of each part of disco_jax; higher layers may import lower ones.
LAYERS = {'ops': 0, 'kernels': 0, 'models': 1, 'data': 1, 'weights': 2, 'training': 3,
          'evaluation': 4, 'inference': 4, 'parity': 5, 'app': 5, '': 6, 'cli': 6}
OUTSIDE = 7  # train.py, eval.py, tools/, bench/, tests/


def _part(module: str):
  """'disco_jax.models.disco' -> 'models'; 'disco_jax' -> ''; a file outside the package -> None."""
  names = module.split('.')
  if names[0] != 'disco_jax':
    return None
  return names[1] if len(names) > 1 else ''


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix('')
  parts = list(rel.parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _imports(tree: ast.AST):
  """(line, imported disco_jax module) of every import statement, and {alias: module}."""
  found, aliases = [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split('.')[0] == 'disco_jax':
          found.append((node.lineno, a.name))
          if a.asname:
            aliases[a.asname] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split('.')[0] != 'disco_jax':
        continue
      for a in node.names:
        # `from disco_jax.models import disco` imports a module; `from ...disco import DISCO` a name.
        target = f'{node.module}.{a.name}'
        is_module = (ROOT / pathlib.Path(*target.split('.'))).with_suffix('.py').exists() or (
            ROOT / pathlib.Path(*target.split('.'))).is_dir()
        found.append((node.lineno, target if is_module else node.module))
        if is_module:
          aliases[a.asname or a.name] = target
        elif a.name.startswith('_'):
          found.append((node.lineno, f'{node.module}:private:{a.name}'))
  return found, aliases


def problems_of(module: str, source: str):
  """Every wrong-way import and private-name use in one module's `source`."""
  tree = ast.parse(source)
  imports, aliases = _imports(tree)
  here = _part(module)
  rank = OUTSIDE if here is None else LAYERS[here]
  found = []
  for line, target in imports:
    if ':private:' in target:
      found.append(f'{module}:{line} imports the private name {target.split(":")[-1]} of '
                   f'{target.split(":")[0]}')
      continue
    there = _part(target)
    if there == here and here is not None:
      continue
    if LAYERS[there] >= rank:
      found.append(f'{module}:{line} imports {target} (layer {there or "disco_jax"} '
                   f'{LAYERS[there]}), not below its own ({here or module} {rank})')
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith('_')
        and not node.attr.startswith('__') and aliases[node.value.id] != module):
      found.append(f'{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}, a private '
                   'name of another module')
  return found


def _sources():
  files = list((ROOT / 'disco_jax').rglob('*.py')) + [ROOT / 'train.py', ROOT / 'eval.py']
  for folder in ('tools', 'bench', 'tests'):
    files += list((ROOT / folder).glob('*.py'))
  return {_module_name(f): f.read_text() for f in files if f.is_file()}


def test_every_import_runs_down_the_layers_and_no_private_name_is_used():
  sources = _sources()
  assert len([m for m in sources if m.startswith('disco_jax.')]) > 30, sorted(sources)
  found = [p for module, source in sorted(sources.items()) for p in problems_of(module, source)]
  assert not found, 'imports against the layering:\n  ' + '\n  '.join(found)


@pytest.mark.parametrize('module, source, wrong', [
    ('disco_jax.models.disco', 'from disco_jax.training import losses', 'training'),
    ('disco_jax.models.disco', 'def f():\n  from disco_jax.data import pipeline', 'data'),
    ('disco_jax.ops.colour', 'import disco_jax.models.layers', 'models'),
    ('disco_jax.evaluation.evaluator', 'from disco_jax.inference import colorize', 'inference'),
    ('disco_jax.training.trainer', 'from disco_jax import parity', 'parity'),
    ('disco_jax.training.tasks', 'from disco_jax.data.pipeline import _fold', '_fold'),
    ('tools.x', 'from disco_jax.training import trainer\ntrainer._with_nan(1, 2)', '_with_nan'),
])
def test_the_checker_finds_wrong_way_imports_and_private_names(module, source, wrong):
  found = problems_of(module, source)
  assert len(found) == 1 and wrong in found[0], found


def test_the_checker_allows_downward_and_same_package_imports():
  source = ('from disco_jax.models import layers\nfrom disco_jax.ops import colour\n'
            'from disco_jax.training import losses\nlayers.conv2d\n')
  assert problems_of('disco_jax.training.tasks', source) == []
  assert problems_of('tools.x', 'from disco_jax.models import disco\ndisco.DISCO()') == []


@pytest.mark.parametrize('module', ['disco_jax', 'disco_jax.models.disco',
                                    'disco_jax.inference.colorize', 'disco_jax.inference.api'])
def test_the_model_and_the_colorize_api_import_no_tensorflow_tfds_or_orbax(module):
  code = (f'import sys, {module}\n'
          "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow', 'tensorflow_datasets', 'orbax'})\n"
          'print(heavy)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.stdout.strip() == '[]', out.stdout + out.stderr
