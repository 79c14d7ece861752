"""`python -m stop_jax.tools.compile_check`: the real step compiled for a simulated mesh, memory reported."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(*overrides):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'stop_jax.tools.compile_check',
      '--config=configs/tiny.py',
      '--num_devices=4',
      '--device=h100',
      *overrides,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  return proc


@pytest.mark.slow
def test_fsdp_halves_the_state_per_device_and_the_report_says_it_fits():
  reports = {}
  for name, overrides in (('dp', ()), ('fsdp2', ('--config.mesh.fsdp=2',))):
    proc = _check(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')][-1]
    reports[name] = json.loads(line[len('RESULT ') :])
    assert 'FITS in 80 GiB per device' in proc.stdout
  dp, fsdp = reports['dp'], reports['fsdp2']
  assert dp['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert fsdp['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1}
  assert dp['num_devices'] == fsdp['num_devices'] == 4
  # Every big kernel is split on its 'embed' dim: about half the bytes (small vectors may not
  # divide, so a little more than half).
  for part in ('params', 'opt_state', 'ema_target'):
    ratio = fsdp['bytes_per_device'][part] / dp['bytes_per_device'][part]
    assert 0.5 <= ratio < 0.56, (part, ratio)
  assert dp['encoder_params'] == fsdp['encoder_params'] > 0
  assert fsdp['compiled']['temp_size_in_bytes'] > 0
  assert fsdp['fits'] is True


def test_a_mesh_that_does_not_match_the_devices_is_a_usage_error():
  proc = _check('--config.mesh.data=3')
  assert proc.returncode != 0
  assert 'needs 3 devices but 4 are available' in proc.stderr
