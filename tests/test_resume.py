"""Exact resume under SIGKILL: train.py killed 5 times (in a step, in an async checkpoint write,
between steps) and rerun ends bit-identical to an uninterrupted run (tools/kill_resume.py).

About 1.5 minutes on 2 cores: seven short train.py processes sharing one compilation cache. The
colorizer's campaign (a 2-step stage-1 run, then five train.py processes) compiles the tiny DISCO
step, eval step and sample grid once: 5.5 CPU minutes, 14 minutes of wall time on the shared
2-core machine at a load average of 13 (bench/NOTES.md).
"""
import numpy as np

from tools import kill_resume


def test_compare_sees_one_flipped_bit_and_a_missing_leaf():
  a = {'params/w': np.linspace(0, 1, 6, dtype=np.float32), 'step': np.int32(3)}
  b = {k: v.copy() for k, v in a.items()}
  assert kill_resume.compare(a, b) == (True, 0.0, [])
  b['params/w'].view(np.int32)[2] ^= 1  # the last mantissa bit
  identical, diff, differing = kill_resume.compare(a, b)
  assert not identical and differing == ['params/w'] and 0 < diff < 1e-7
  identical, diff, differing = kill_resume.compare(a, {'step': a['step']})
  assert not identical and diff == float('inf') and differing == ['params/w']


def test_five_sigkills_resume_bit_identical(tmp_path, tmp_path_factory):
  # The compilation cache of the session's other train.py tests, which use the same config.
  result = kill_resume.campaign(tmp_path, kills=5, seed=0,
                                cache_dir=tmp_path_factory.getbasetemp() / 'jax_cache')
  details = result['details']
  assert result['kills'] == result['kills_survived'] == 5, details
  assert result['steps'] == (24, 24)
  # Bitwise, no tolerance: the resume contract is exact (batches and keys are functions of step).
  assert result['resumes_bit_identical'] and result['max_abs_diff'] == 0.0, result['differing']
  names = result['compared']
  for part in ('step', 'params/', 'opt_state/', 'model_state/batch_stats/'):
    assert any(n.startswith(part) for n in names), (part, names)
  kills = [d for d in details if d['kind'] != 'final']
  assert {d['kind'] for d in kills} == set(kill_resume.KINDS)
  # At least one kill caught a save in flight and left its unfinished tmp folder behind.
  assert any(d['kind'] == 'save' and d['tmp_left'] for d in kills), kills
  # Reruns resumed from ever later checkpoints written by killed processes. The schedule makes
  # each kill wait for a new commit, so the first four starts differ; later kills may be capped
  # by the end of the run.
  starts = [d['started_from'] for d in details]
  assert starts == sorted(starts) and len(set(starts)) >= 4, starts


def test_colorizer_three_sigkills_resume_bit_identical(tmp_path, tmp_path_factory):
  """Stage 2 with dropout, k-means anchors, spectral norm and the VGG19 term (random weights):
  one kill of each kind, reruns end bit-identical, spectral vectors and BatchNorm included."""
  result = kill_resume.campaign(tmp_path, kills=3, seed=0, task='disco', num_steps=10,
                                cache_dir=tmp_path_factory.getbasetemp() / 'jax_cache')
  assert result['kills'] == result['kills_survived'] == 3, result['details']
  assert result['steps'] == (10, 10)
  assert result['resumes_bit_identical'] and result['max_abs_diff'] == 0.0, result['differing']
  names = result['compared']
  for part in ('params/', 'opt_state/', 'model_state/batch_stats/', 'model_state/spectral/'):
    assert any(n.startswith(part) for n in names), (part, names)
  assert {d['kind'] for d in result['details'] if d['kind'] != 'final'} == set(kill_resume.KINDS)
