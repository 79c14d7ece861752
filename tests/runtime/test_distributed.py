"""Multi-process start-up: the plan on fake clusters, and a real two-process run on localhost."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from stop_jax.runtime import distributed
from stop_jax.runtime.distributed import DistributedConfigError, InitPlan, plan_initialize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_FLAGS = dict.fromkeys(distributed.FLAG_NAMES)

SLURM_TASK = {
  'SLURM_JOB_ID': '4242',
  'SLURM_NTASKS': '16',
  'SLURM_PROCID': '3',
  'SLURM_LOCALID': '3',
  'SLURM_STEP_NODELIST': 'gpu[001-002]',
}
OMPI_RANK = {
  'OMPI_COMM_WORLD_SIZE': '4',
  'OMPI_COMM_WORLD_RANK': '1',
  'OMPI_COMM_WORLD_LOCAL_RANK': '1',
  'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911',
}


def flags(**kw):
  return {**NO_FLAGS, **kw}


def explicit(**kw):
  return flags(**{'coordinator_address': 'host0:1234', 'num_processes': 2, 'process_id': 1, **kw})


def test_a_single_process_gets_no_plan():
  assert plan_initialize(NO_FLAGS, {}) is None
  # One SLURM task, one MPI rank, a one-host TPU VM: still a single process.
  env = {**SLURM_TASK, 'SLURM_NTASKS': '1', 'OMPI_COMM_WORLD_SIZE': '1'}
  assert plan_initialize(NO_FLAGS, env, tpu_vm_workers=1) is None


def test_explicit_flags_are_used_as_given_without_cluster_detection():
  plan = plan_initialize(explicit(local_device_ids='0,1'), {})
  assert plan == InitPlan(
    source='flags',
    description='process 1 of 2 (flags), coordinator host0:1234',
    coordinator_address='host0:1234',
    num_processes=2,
    process_id=1,
    local_device_ids=(0, 1),
    cluster_detection_method='deactivate',
  )
  assert plan.initialize_kwargs() == {
    'coordinator_address': 'host0:1234',
    'num_processes': 2,
    'process_id': 1,
    'local_device_ids': [0, 1],
    'cluster_detection_method': 'deactivate',
  }


def test_explicit_flags_win_over_a_cluster_environment():
  plan = plan_initialize(explicit(process_id=0), {**SLURM_TASK, **OMPI_RANK})
  assert plan.source == 'flags' and plan.process_id == 0
  assert plan.cluster_detection_method == 'deactivate'


def test_absl_list_flag_values_are_accepted():
  assert plan_initialize(explicit(local_device_ids=['2', '3']), {}).local_device_ids == (2, 3)


@pytest.mark.parametrize(
  'given, missing',
  [
    ({'num_processes': 2}, '--coordinator_address, --process_id'),
    ({'num_processes': 2, 'process_id': 0}, 'without --coordinator_address'),
    ({'coordinator_address': 'h:1'}, 'without --num_processes, --process_id'),
    ({'coordinator_address': 'h:1', 'num_processes': 2}, 'without --process_id'),
    ({'process_id': 0}, 'without --coordinator_address, --num_processes'),
  ],
)
def test_half_given_flags_are_refused_naming_the_missing_ones(given, missing):
  with pytest.raises(DistributedConfigError, match=missing):
    plan_initialize(flags(**given), {})
  # A cluster environment does not excuse them: the three flags go together.
  with pytest.raises(DistributedConfigError, match=missing):
    plan_initialize(flags(**given), SLURM_TASK)


@pytest.mark.parametrize(
  'kw, message',
  [
    ({'process_id': 2}, r'--process_id=2 is not allowed: an integer in \[0, 2\)'),
    ({'process_id': -1}, r'--process_id=-1 is not allowed'),
    ({'num_processes': 0, 'process_id': 0}, '--num_processes=0 is not allowed: a positive'),
    ({'coordinator_address': 'host0'}, "--coordinator_address='host0' is not allowed: HOST:PORT"),
    ({'coordinator_address': ':1234'}, "--coordinator_address=':1234' is not allowed"),
    ({'coordinator_address': 'h:http'}, "--coordinator_address='h:http' is not allowed"),
    ({'coordinator_address': 'h:70000'}, 'a port in 1..65535'),
    ({'local_device_ids': 'a,b'}, "--local_device_ids='a,b' is not allowed: a comma-separated"),
    ({'local_device_ids': '0,0'}, 'distinct non-negative'),
    ({'local_device_ids': '-1'}, 'distinct non-negative'),
  ],
)
def test_bad_flag_values_are_refused_naming_the_value(kw, message):
  with pytest.raises(DistributedConfigError, match=message):
    plan_initialize(explicit(**kw), {})


def test_ipv6_coordinator_is_accepted():
  assert plan_initialize(explicit(coordinator_address='[::1]:1234'), {}).num_processes == 2


def test_slurm_tasks_use_jax_detection_with_the_job_numbers():
  plan = plan_initialize(NO_FLAGS, SLURM_TASK)
  assert (plan.source, plan.cluster_detection_method) == ('slurm', 'slurm')
  assert (plan.num_processes, plan.process_id) == (16, 3)
  assert plan.coordinator_address is None and plan.local_device_ids is None
  assert 'SLURM job 4242: task 3 of 16' in plan.description


def test_the_plan_agrees_with_jax_own_cluster_detection(monkeypatch):
  from jax._src import clusters

  for env, method in [(SLURM_TASK, 'slurm'), (OMPI_RANK, 'ompi')]:
    with monkeypatch.context() as m:
      for k, v in env.items():
        m.setenv(k, v)
      address, num, pid, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, method, 1
      )
    plan = plan_initialize(NO_FLAGS, env)
    assert (plan.num_processes, plan.process_id) == (num, pid)
    assert address  # JAX finds the coordinator that the plan leaves to it
    assert local == [int(env.get('SLURM_LOCALID', env.get('OMPI_COMM_WORLD_LOCAL_RANK')))]


def test_local_device_ids_override_slurm_one_gpu_per_task():
  plan = plan_initialize(flags(local_device_ids='0,1,2,3'), SLURM_TASK)
  assert plan.source == 'slurm' and plan.initialize_kwargs()['local_device_ids'] == [0, 1, 2, 3]


def test_the_slurm_batch_script_itself_is_refused():
  # sbatch's own shell has SLURM_NTASKS but is no srun task: it must not wait for 15 others.
  env = {k: v for k, v in SLURM_TASK.items() if k != 'SLURM_STEP_NODELIST'}
  with pytest.raises(DistributedConfigError, match='SLURM_STEP_NODELIST is unset: .* srun'):
    plan_initialize(NO_FLAGS, env)


def test_open_mpi_uses_jax_detection_and_wins_over_slurm():
  plan = plan_initialize(NO_FLAGS, {**SLURM_TASK, **OMPI_RANK})
  assert (plan.source, plan.cluster_detection_method) == ('ompi', 'ompi')
  assert (plan.num_processes, plan.process_id) == (4, 1)


def test_open_mpi_without_its_launcher_uri_asks_for_explicit_flags():
  env = {k: v for k, v in OMPI_RANK.items() if k != 'OMPI_MCA_orte_hnp_uri'}
  with pytest.raises(DistributedConfigError, match='OMPI_MCA_orte_hnp_uri is unset.*--coordinator'):
    plan_initialize(NO_FLAGS, env)


def test_a_non_integer_cluster_variable_is_named():
  with pytest.raises(DistributedConfigError, match="SLURM_NTASKS='many' is not an integer"):
    plan_initialize(NO_FLAGS, {**SLURM_TASK, 'SLURM_NTASKS': 'many'})


@pytest.mark.parametrize(
  'env, workers, where',
  [
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3'}, None, 'GKE): 4 hosts per slice x 1 slice'),
    ({'TPU_PROCESS_ADDRESSES': 'h0:8476,h1:8476'}, None, 'GKE): 2 hosts per slice'),
    ({}, 8, 'TPU VM): 8 hosts per slice x 1 slice'),
    ({'MEGASCALE_NUM_SLICES': '2'}, 1, 'TPU VM): 1 hosts per slice x 2 slice'),
  ],
)
def test_a_multi_worker_tpu_is_left_to_jax_tpu_detection(env, workers, where):
  plan = plan_initialize(NO_FLAGS, env, tpu_vm_workers=workers)
  assert plan.source == 'tpu' and where in plan.description
  assert plan.initialize_kwargs() == {
    'coordinator_address': None,
    'num_processes': None,
    'process_id': None,
    'local_device_ids': None,
    'cluster_detection_method': None,
  }


def test_local_device_ids_need_a_multi_process_run_and_no_tpu():
  with pytest.raises(DistributedConfigError, match='only applies to a multi-process run'):
    plan_initialize(flags(local_device_ids='0'), {})
  with pytest.raises(DistributedConfigError, match='not allowed on a TPU pod'):
    plan_initialize(flags(local_device_ids='0'), {}, tpu_vm_workers=4)


def test_unknown_flag_names_are_refused():
  with pytest.raises(DistributedConfigError, match='unknown keys'):
    plan_initialize({**NO_FLAGS, 'num_hosts': 2}, {})


def test_initialize_calls_jax_with_the_plan(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  assert distributed.initialize(NO_FLAGS, environ={}) is None
  assert calls == []
  plan = distributed.initialize(NO_FLAGS, environ=SLURM_TASK)
  assert calls == [plan.initialize_kwargs()]
  assert calls[0]['cluster_detection_method'] == 'slurm'
  assert jax.config.jax_cpu_collectives_implementation == 'gloo'


def test_main_turns_bad_flags_into_a_usage_error(tmp_path):
  proc = subprocess.run(
    [sys.executable, '-m', 'stop_jax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}']
    + ['--num_processes=2', '--process_id=0'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=_cpu_env(),
    timeout=300,
  )
  assert proc.returncode != 0
  assert '--num_processes, --process_id given without --coordinator_address' in proc.stderr
  assert not os.path.exists(tmp_path / 'config.json')  # failed before training started


def _cpu_env() -> dict:
  """One CPU device per process, no cluster variables from the machine running the tests."""
  env = {
    k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'JAX_', 'TPU_'))
  }
  env.pop('XLA_FLAGS', None)
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


TRAIN_ARGS = [
  '--config=configs/tiny.py:steps=3',
  '--config.model.depth=2',  # the multi-process path is the same at any depth; compiles faster
  '--config.predictor.depth=1',
  '--config.eval.probe=False',
  '--config.log_every_steps=1',
]


def _start(workdir, log_path, *extra):
  with open(log_path, 'w') as log:  # a file, not a pipe: a chatty child never blocks on it
    return subprocess.Popen(
      [sys.executable, '-m', 'stop_jax.main', *TRAIN_ARGS, f'--workdir={workdir}', *extra],
      cwd=ROOT,
      env=_cpu_env(),
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def _finish(procs, log_paths, timeout_s=540) -> list[str]:
  """Waits for all; if one fails the others are killed (they would wait for it at a collective)."""
  deadline = time.monotonic() + timeout_s
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [open(path).read() for path in log_paths]
  for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
    assert p.returncode == 0, f'process {i} exited with {p.returncode}:\n{log[-6000:]}'
  return logs


def _losses(workdir) -> list[float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


# One test, not three sharing a fixture: under pytest-xdist each worker would redo the training.
@pytest.mark.slow
def test_two_processes_on_localhost_train_like_one_process(tmp_path):
  from stop_jax.runtime import checkpointing

  multi, single = tmp_path / 'multi', tmp_path / 'single'
  port = _free_port()
  multi_logs = [tmp_path / f'process{i}.log' for i in range(2)]
  workers = [
    _start(
      multi,
      multi_logs[i],
      f'--coordinator_address=localhost:{port}',
      '--num_processes=2',
      f'--process_id={i}',
    )
    for i in range(2)
  ]
  logs = _finish(workers, multi_logs)
  _finish([_start(single, tmp_path / 'single.log')], [tmp_path / 'single.log'])

  assert 'process 0 of 2: 1 local devices (cpu), 2 global devices' in logs[0]
  assert 'process 1 of 2: 1 local devices (cpu), 2 global devices' in logs[1]
  assert 'plan:' in logs[0] and 'plan:' not in logs[1]  # only process 0 logs at INFO

  losses_multi, losses_single = _losses(multi), _losses(single)
  assert len(losses_multi) == 3  # written once, by process 0
  np.testing.assert_allclose(losses_multi, losses_single, rtol=1e-5)

  step_m, tree_m = checkpointing.load_checkpoint(str(multi))
  step_s, tree_s = checkpointing.load_checkpoint(str(single))
  assert step_m == step_s == 3
  for key in ('params', 'target_params'):
    leaves_m, leaves_s = jax.tree.leaves(tree_m[key]), jax.tree.leaves(tree_s[key])
    assert len(leaves_m) == len(leaves_s) > 0
    for a, b in zip(leaves_m, leaves_s, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
