"""Stage-by-stage parity with the official PyTorch model on the fixtures of `shared/parity`.

Tolerances are those the fixtures' README derives from the float32-vs-float64 error of the
official path (about 10-30x the observed error, to allow for other conv/matmul algorithms):
1e-5 for pixel and token stages, 5e-5 for transformer outputs, logits and `diffused`, rtol 1e-5 for
the losses. Every `case_*.npz` in the folder is checked, whatever its size, batch or weight seed.
"""
import re

import jax
import numpy as np
import pytest

from disco_jax import parity
from disco_jax.models import disco
from disco_jax.weights import convert
from tests.conftest import make_state_dict, parity_dir

TIGHT = ('assoc', 'features', 'tokens', 'spix_ab', 'conf_sum', 'spix_size', 'pos', 'hint_emb',
         'ab_pred')
TRANSFORMER = ('modeler_out', 'modeler_logits', 'generator_out', 'generator_logits', 'diffused')
LOSSES = ('ce_modeler', 'wce_modeler', 'ce_generator', 'wce_generator')


def _cases():
  return sorted(parity_dir().glob('case_*.npz')) or [pytest.param(None, marks=pytest.mark.skip(
      reason=f'no case_*.npz parity fixtures in {parity_dir()} (set DISCO_PARITY_DIR)'))]


def _make_state_dict(folder, seed):
  """A fresh copy (tests mutate it) of the official-layout synthetic weights for `seed`."""
  return dict(make_state_dict(folder, seed))


@pytest.fixture(scope='module')
def variables_for_seed(parity):
  cache = {}

  def get(seed):
    if seed not in cache:
      cache[seed] = convert.variables_from_state_dict(_make_state_dict(parity, seed))
    return cache[seed]

  return get


@pytest.mark.parametrize('cpu_kernels', [False, True], ids=['plain', 'cpu_kernels'])
@pytest.mark.parametrize('case', _cases(), ids=lambda p: getattr(p, 'stem', 'none'))
def test_stages_match_official(case, cpu_kernels, variables_for_seed):
  fx = dict(np.load(case))
  variables = variables_for_seed(int(fx['state_dict_seed']))
  with jax.default_matmul_precision('highest'):
    out = parity.forward_stages(variables, fx['gray'], fx['ab'], fx['anchor_mask'],
                               fx['anchor_label'], disco.DISCO(cpu_kernels=cpu_kernels))
  checked = []
  for key, atol in [(k, 1e-5) for k in TIGHT] + [(k, 5e-5) for k in TRANSFORMER]:
    if key in fx:  # large cases may omit `features` and `diffused`
      np.testing.assert_allclose(np.asarray(out[key]), fx[key], atol=atol, rtol=1e-5,
                                 err_msg=f'stage {key} of {case.name}')
      checked.append(key)
  for key in LOSSES:
    np.testing.assert_allclose(float(out[key]), float(fx[key]), rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(np.argmax(out['modeler_logits'], -1),
                                np.argmax(fx['modeler_logits'], -1))
  assert {'assoc', 'tokens', 'modeler_logits', 'generator_logits', 'ab_pred'} <= set(checked)


def test_converter_reports_unknown_missing_and_misshaped_keys(parity):
  sd = _make_state_dict(parity, 0)
  sd.pop('repnet.conv9_2.0.bias')
  sd['repnet.extra.weight'] = np.zeros((3, 3), np.float32)
  sd['hintpath.layers.2.linear1.weight'] = np.zeros((255, 64), np.float32)
  with pytest.raises(ValueError) as err:
    convert.variables_from_state_dict(sd)
  msg = str(err.value)
  assert 'repnet.extra.weight' in msg
  assert 'params/repnet/conv9_2_0/bias' in msg
  assert re.search(r'hintpath\.layers\.2\.linear1\.weight: checkpoint \(64, 255\)', msg)


def test_converter_cli_and_spixnet_only_checkpoints(parity, tmp_path):
  sd = _make_state_dict(parity, 0)
  np.savez(tmp_path / 'sd.npz', **sd)
  convert.main([str(tmp_path / 'sd.npz'), str(tmp_path / 'v.msgpack')])
  loaded = convert.load_variables(tmp_path / 'v.msgpack')
  direct = convert.variables_from_state_dict(sd)
  np.testing.assert_array_equal(loaded['spectral']['repnet']['conv4_3_2']['v'],
                                direct['spectral']['repnet']['conv4_3_2']['v'])
  # A stage-1 checkpoint: SPixelNet's keys under `net.`, saved from DDP (`module.` prefix).
  stage1 = {'module.net.' + k[len('segnet.net.'):]: v for k, v in sd.items()
            if k.startswith('segnet.')}
  seg = convert.variables_from_state_dict(stage1, spixnet_only=True)
  assert set(seg['params']) == {'segnet'}
  np.testing.assert_array_equal(seg['params']['segnet']['deconv2_0']['kernel'],
                                direct['params']['segnet']['deconv2_0']['kernel'])
  with pytest.raises(ValueError, match='missing entries'):
    convert.variables_from_state_dict(stage1)


def test_damaged_variables_file_is_named(tmp_path):
  bad = tmp_path / 'bad.msgpack'
  bad.write_bytes(b'\x00garbage')
  with pytest.raises(ValueError, match='bad.msgpack'):
    convert.load_variables(bad)
  with pytest.raises(FileNotFoundError, match='python -m disco_jax.weights.convert'):
    convert.load_variables(tmp_path / 'absent.msgpack')
