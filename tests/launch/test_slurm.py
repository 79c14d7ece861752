"""launch/slurm.sbatch: the srun command, and SIGTERM -> save -> exit 75 -> requeue.

The batch script really runs under bash with a fake `srun` (which exits with a chosen code,
after SIGTERM if asked) and a fake `scontrol` on PATH, as SLURM would run it in a job.
"""

import os
import re
import shlex
import signal
import subprocess

import pytest

from tests.launch.conftest import (
  LAUNCH,
  PREEMPTED_EXIT_CODE,
  ROOT,
  clean_env,
  run_script,
  wait_for,
)

SLURM = os.path.join(LAUNCH, 'slurm.sbatch')
FAKE_JOB = {
  'SLURM_JOB_ID': '1234',
  'SLURM_NTASKS': '16',
  'SLURM_JOB_NUM_NODES': '2',
  'SLURM_NTASKS_PER_NODE': '8',
  'SLURM_GPUS_ON_NODE': '8',
  'SLURM_CPUS_PER_TASK': '12',
  'SLURM_JOB_NODELIST': 'gpu[007-008]',
}
MAIN = ['python', '-m', 'stop_jax.main']


def _sbatch_lines() -> dict[str, str]:
  with open(SLURM) as f:
    return dict(
      re.match(r'#SBATCH --([\w-]+)=?(.*)', line).groups()
      for line in f
      if line.startswith('#SBATCH')
    )


def test_the_batch_header_asks_for_requeue_append_and_an_early_sigterm():
  sbatch = _sbatch_lines()
  assert sbatch['requeue'] == '' and sbatch['open-mode'] == 'append'
  where, seconds = re.fullmatch(r'(B):TERM@(\d+)', sbatch['signal']).groups()
  assert int(seconds) >= 120  # minutes for a ViT-H save, not SLURM's default 30 s KillWait
  assert sbatch['ntasks-per-node'] == sbatch['gpus-per-node']


def test_dry_run_in_a_job_derives_the_processes_and_gives_srun_cpus_and_per_task_logs():
  proc = run_script(
    SLURM, '--dry_run', 'configs/vitb16.py', '/shared/r', '--config.seed=2',
    env=clean_env(**FAKE_JOB),
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert '2 nodes (gpu[007-008]) x 8 tasks = 16 processes, one per GPU' in out
  # JAX's SLURM rule: the job's first node, port 61440 + job id mod 4096.
  assert 'num_processes=16' in out and f'coordinator=gpu007:{61440 + 1234}' in out
  assert f'cd {ROOT}' in out and 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9' in out
  assert 'SRUN_CPUS_PER_TASK=12' in out and 'mkdir -p /shared/r/logs' in out
  assert 'CUDA_VISIBLE_DEVICES' not in out
  assert shlex.split(out.splitlines()[-1]) == [
    'srun',
    '--kill-on-bad-exit=0',
    '--output=/shared/r/logs/%x-%j_%t.log',
    '--open-mode=append',
    '--cpus-per-task=12',
    *MAIN,
    '--config=configs/vitb16.py',
    '--workdir=/shared/r',
    '--config.seed=2',
  ]


def test_dry_run_with_bind_gpus_gives_each_task_its_own_gpu():
  proc = run_script(
    SLURM, '--bind_gpus', '--dry_run', 'configs/tiny.py', '/r', env=clean_env(**FAKE_JOB)
  )
  assert proc.returncode == 0, proc.stderr
  srun = shlex.split(proc.stdout.splitlines()[-1])
  assert '--gpus-per-task=1' in srun[: srun.index('python')]


def test_a_gs_workdir_goes_through_and_the_task_logs_stay_in_the_repository():
  proc = run_script(SLURM, '--dry_run', 'configs/tiny.py', 'gs://bkt/r', env=clean_env(**FAKE_JOB))
  assert proc.returncode == 0, proc.stderr
  srun = shlex.split(proc.stdout.splitlines()[-1])
  assert f'--output={ROOT}/logs/%x-%j_%t.log' in srun and '--workdir=gs://bkt/r' in srun


def test_dry_run_outside_a_job_says_it_relies_on_auto_detection():
  proc = run_script(SLURM, '--dry_run', 'configs/tiny.py', '/shared/r')
  assert proc.returncode == 0, proc.stderr
  assert 'not inside a SLURM job' in proc.stdout and 'auto-detects' in proc.stdout
  assert proc.stdout.splitlines()[-1].startswith('srun --kill-on-bad-exit=0 ')


@pytest.mark.parametrize(
  'nodelist',
  ['node001', 'node001,host2', 'node[001-015],host2', 'node[003,007-015]', 'gpu-a[09-10],x'],
)
def test_slurm_coordinator_matches_jax_own_slurm_detection(nodelist, monkeypatch):
  from jax._src.clusters import slurm_cluster

  job = {**FAKE_JOB, 'SLURM_JOB_NODELIST': nodelist}
  proc = run_script(SLURM, '--dry_run', 'configs/tiny.py', '/shared/r', env=clean_env(**job))
  assert proc.returncode == 0, proc.stderr
  monkeypatch.setenv('SLURM_JOB_ID', '1234')
  monkeypatch.setenv('SLURM_STEP_NODELIST', nodelist)
  expected = slurm_cluster.SlurmCluster.get_coordinator_address(None, None)
  assert f'coordinator={expected}' in proc.stdout


def test_slurm_refuses_one_task_per_node_with_several_gpus():
  job = {**FAKE_JOB, 'SLURM_NTASKS': '2', 'SLURM_NTASKS_PER_NODE': '1'}
  proc = run_script(SLURM, '--dry_run', 'configs/tiny.py', '/shared/r', env=clean_env(**job))
  assert proc.returncode == 2
  assert '--ntasks-per-node=1 but 8 GPUs per node' in proc.stderr


@pytest.mark.parametrize(
  'args, env, message',
  [
    (('configs/tiny.py', '/shared/r'), {}, 'not inside a SLURM job: submit with'),
    (('--dry_run', 'configs/tiny.py', 'rel/dir'), {}, 'gs://BUCKET/PATH, or an absolute path'),
    (('--dry_run', 'configs/nope.py', '/r'), {}, "'configs/nope.py' does not exist"),
    (('--dry_run', 'configs/tiny.py', '/r'), {'STOP_JAX_DIR': '/'}, 'not the stop_jax repository'),
  ],
)
def test_slurm_refuses_bad_submissions(args, env, message):
  proc = run_script(SLURM, *args, env=clean_env(**env))
  assert proc.returncode == 2
  assert message in proc.stderr


def _batch_job(fakes, tmp_path, srun_exit, wait_term, **extra):
  """Starts the batch script as SLURM would in job 1234, with the fake srun."""
  env = fakes.env(
    **FAKE_JOB,
    FAKE_SRUN_EXIT=str(srun_exit),
    FAKE_SRUN_WAIT_TERM='1' if wait_term else '0',
    VENV=str(tmp_path / 'no_venv'),
    **extra,
  )
  return subprocess.Popen(
    ['bash', SLURM, 'configs/tiny.py', str(tmp_path / 'run'), '--config.seed=1'],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.parametrize(
  'srun_exit, expected_exit, requeued',
  [(PREEMPTED_EXIT_CODE, 0, True), (0, 0, False), (3, 3, False)],
  ids=['saved-75-requeues', 'finished-0', 'failed-3'],
)
def test_sigterm_goes_to_the_srun_step_and_only_the_preempted_code_requeues(
  fakes, tmp_path, srun_exit, expected_exit, requeued
):
  job = _batch_job(fakes, tmp_path, srun_exit, wait_term=True)
  wait_for(lambda: fakes.calls('srun'), what='srun to start')
  job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 does before the time limit
  out, err = job.communicate(timeout=30)
  assert job.returncode == expected_exit, out + err
  assert fakes.calls('srun-got-sigterm')  # passed on to the step (and by srun to every task)
  requeues = [c['argv'] for c in fakes.calls('scontrol')]
  assert requeues == ([['requeue', '1234']] if requeued else [])
  assert ('not requeued' in err) == (expected_exit != 0)  # it may not have saved
  (srun,) = fakes.calls('srun')
  assert srun['argv'][:5] == [
    '--kill-on-bad-exit=0',
    f'--output={tmp_path}/run/logs/%x-%j_%t.log',
    '--open-mode=append',
    '--cpus-per-task=12',
    *MAIN[:1],
  ]
  assert srun['env']['SRUN_CPUS_PER_TASK'] == '12'
  assert 'CUDA_VISIBLE_DEVICES' not in srun['env']  # each task picks its GPU itself
  assert os.path.isdir(tmp_path / 'run' / 'logs')


@pytest.mark.parametrize(
  'srun_exit, expected_exit, requeued',
  [(PREEMPTED_EXIT_CODE, 0, True), (0, 0, False), (1, 1, False)],
  ids=['preempted-by-slurm-75-requeues', 'finished-0', 'failed-1'],
)
def test_the_exit_code_of_the_run_decides_without_a_signal(
  fakes, tmp_path, srun_exit, expected_exit, requeued
):
  # SLURM's own preemption signals every task directly: only the tasks' exit code is seen here.
  job = _batch_job(fakes, tmp_path, srun_exit, wait_term=False)
  out, err = job.communicate(timeout=30)
  assert job.returncode == expected_exit, out + err
  assert bool(fakes.calls('scontrol')) == requeued


def test_a_failed_requeue_keeps_the_preempted_exit_code(fakes, tmp_path):
  job = _batch_job(fakes, tmp_path, PREEMPTED_EXIT_CODE, wait_term=False, FAKE_SCONTROL_EXIT='1')
  out, err = job.communicate(timeout=30)
  assert job.returncode == PREEMPTED_EXIT_CODE, out + err
  assert 'resubmit the same command to resume' in err
