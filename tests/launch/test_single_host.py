"""launch/single_host.sh and launch/multi_gpu.sh: one process on this machine."""

import os
import shlex

from tests.launch.conftest import LAUNCH, ROOT, run_script

SINGLE_HOST = os.path.join(LAUNCH, 'single_host.sh')
MULTI_GPU = os.path.join(LAUNCH, 'multi_gpu.sh')
TINY = os.path.join(ROOT, 'configs', 'tiny.py')


def test_single_host_dry_run_prints_the_command():
  proc = run_script(
    SINGLE_HOST, '--dry_run', 'configs/tiny.py:steps=5', '/tmp/run dir', '--config.seed=3'
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout.strip()
  assert out.endswith(
    r'python -m stop_jax.main --config=configs/tiny.py:steps=5 --workdir=/tmp/run\ dir'
    ' --config.seed=3'
  )
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9' in out


def test_single_host_refuses_a_missing_config():
  proc = run_script(SINGLE_HOST, 'configs/nope.py', '/tmp/x')
  assert proc.returncode == 2
  assert "configs/nope.py' does not exist" in proc.stderr


def test_single_host_passes_a_gs_workdir_through_and_makes_no_local_folder(fakes, tmp_path):
  proc = run_script(
    SINGLE_HOST,
    TINY,
    'gs://bkt/runs/a',
    '--config.seed=1',
    env=fakes.env(FAKE_MAIN_STEPS='1'),
    cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stderr
  (main,) = fakes.calls('main')
  assert main['argv'][2:] == [f'--config={TINY}', '--workdir=gs://bkt/runs/a', '--config.seed=1']
  assert os.listdir(tmp_path) == ['fakes']  # no ./gs: folder


def test_single_host_makes_a_local_workdir(fakes, tmp_path):
  proc = run_script(SINGLE_HOST, TINY, 'runs/b', env=fakes.env(FAKE_MAIN_STEPS='1'), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert os.path.isdir(tmp_path / 'runs' / 'b')


def test_multi_gpu_dry_run_pins_the_gpus_and_the_platform():
  proc = run_script(
    MULTI_GPU, '--gpus=0,1', '--dry_run', 'configs/tiny.py', '/tmp/a b', '--config.seed=1'
  )
  assert proc.returncode == 0, proc.stderr
  assert shlex.split(proc.stdout) == [
    'env',
    'JAX_PLATFORMS=cuda',
    'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9',
    'TF_CPP_MIN_LOG_LEVEL=2',
    'CUDA_VISIBLE_DEVICES=0,1',
    'python',
    '-m',
    'stop_jax.main',
    '--config=configs/tiny.py',
    '--workdir=/tmp/a b',
    '--config.seed=1',
  ]


def test_multi_gpu_without_gpus_flag_uses_every_visible_gpu():
  proc = run_script(MULTI_GPU, '--dry_run', 'configs/tiny.py', '/tmp/x')
  assert proc.returncode == 0, proc.stderr
  assert 'CUDA_VISIBLE_DEVICES' not in proc.stdout
  assert 'JAX_PLATFORMS=cuda' in proc.stdout


def test_multi_gpu_refuses_a_bad_gpu_list():
  proc = run_script(MULTI_GPU, '--gpus=0;1', '--dry_run', 'configs/tiny.py', '/tmp/x')
  assert proc.returncode == 2
  assert "--gpus='0;1' is not allowed" in proc.stderr


def test_multi_gpu_passes_a_gs_workdir_through_and_makes_no_local_folder(fakes, tmp_path):
  proc = run_script(
    MULTI_GPU, '--gpus=1', TINY, 'gs://bkt/runs/c', env=fakes.env(FAKE_MAIN_STEPS='1'), cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stderr
  (main,) = fakes.calls('main')
  assert main['argv'][2:] == [f'--config={TINY}', '--workdir=gs://bkt/runs/c']
  assert main['env']['CUDA_VISIBLE_DEVICES'] == '1' and main['env']['JAX_PLATFORMS'] == 'cuda'
  assert os.listdir(tmp_path) == ['fakes']
