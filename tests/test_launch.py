"""The launch script's --dry_run prints the exact command it would run."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch', 'single_host.sh')


def test_single_host_dry_run_prints_the_command():
  out = subprocess.run(
    ['bash', SCRIPT, '--dry_run', 'configs/tiny.py:steps=5', '/tmp/run dir', '--config.seed=3'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  assert out.endswith(
    r'python -m stop_jax.main --config=configs/tiny.py:steps=5 --workdir=/tmp/run\ dir'
    ' --config.seed=3'
  )
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9' in out


def test_single_host_refuses_a_missing_config():
  proc = subprocess.run(
    ['bash', SCRIPT, 'configs/nope.py', '/tmp/x'], cwd=ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 2
  assert "configs/nope.py' does not exist" in proc.stderr
