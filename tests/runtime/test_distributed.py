"""Multi-process start-up: the plan on fake clusters (real runs: test_multiprocess.py)."""

import os
import subprocess
import sys

import jax
import pytest

from stop_jax.runtime import distributed
from stop_jax.runtime.distributed import DistributedConfigError, InitPlan, plan_initialize
from tests.subprocess_env import cpu_env

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
  assert plan.description == 'SLURM task 3 of 16 (job 4242) on nodes gpu[001-002]'


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


# SLURM_TASK is local task 3; its node runs 8 tasks of the job and holds 8 of its GPUs.
ON_NODE = {'SLURM_NODEID': '0', 'SLURM_STEP_TASKS_PER_NODE': '8(x2)', 'SLURM_GPUS_ON_NODE': '8'}


@pytest.mark.parametrize(
  'env, node_gpus, ids',
  [
    # Every task sees all 8 GPUs, one task per GPU: the one of its local rank (JAX's convention).
    ({'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}, None, (3,)),
    ({}, 8, (3,)),  # nothing set: the driver's GPUs are the visible ones
    # srun --gpus-per-task=1 (or --gpu-bind): each task sees only its GPU, renumbered 0.
    ({'CUDA_VISIBLE_DEVICES': '3'}, 8, (0,)),
    ({'CUDA_VISIBLE_DEVICES': 'GPU-6b1a,GPU-77c2'}, 8, (0, 1)),  # two bound GPUs, by UUID
    # Two tasks on a node sharing its 8 GPUs: four each, by local rank (task 3 -> local rank 1).
    (
      {
        'SLURM_STEP_TASKS_PER_NODE': '2(x8)',
        'SLURM_LOCALID': '1',
        'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7',
      },
      None,
      (4, 5, 6, 7),
    ),
    ({'CUDA_VISIBLE_DEVICES': ''}, 8, None),  # no GPU: a CPU job, JAX's default
    ({}, None, None),  # nothing known: JAX's default (the local rank's)
  ],
)
def test_slurm_tasks_drive_the_gpus_they_can_see(env, node_gpus, ids):
  plan = plan_initialize(NO_FLAGS, {**SLURM_TASK, **ON_NODE, **env}, node_gpus=node_gpus)
  assert plan.local_device_ids == ids
  # Never an id the task cannot see.
  visible = distributed.cluster_env.visible_accelerators({**ON_NODE, **env}, node_gpus)
  assert ids is None or max(ids) < visible.count


def test_one_task_per_node_drives_all_its_gpus():
  env = {**SLURM_TASK, 'SLURM_LOCALID': '0', 'SLURM_NODEID': '1'}
  env.update(SLURM_STEP_TASKS_PER_NODE='1(x16)', CUDA_VISIBLE_DEVICES='0,1,2,3')
  assert plan_initialize(NO_FLAGS, env).local_device_ids == (0, 1, 2, 3)


def test_gpus_that_do_not_split_over_the_tasks_are_refused():
  env = {**SLURM_TASK, **ON_NODE, 'SLURM_STEP_TASKS_PER_NODE': '3,3', 'SLURM_LOCALID': '2'}
  with pytest.raises(DistributedConfigError, match=r'SLURM task 3 of 16 \(local rank 2 of 3'):
    plan_initialize(NO_FLAGS, {**env, 'SLURM_GPUS_ON_NODE': '8'}, node_gpus=8)


def test_open_mpi_tasks_read_the_same_table():
  env = {**OMPI_RANK, 'OMPI_COMM_WORLD_LOCAL_SIZE': '4', 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
  assert plan_initialize(NO_FLAGS, env).local_device_ids == (1,)
  env['CUDA_VISIBLE_DEVICES'] = '2'  # mpirun bound one GPU per rank
  assert plan_initialize(NO_FLAGS, env).local_device_ids == (0,)


def test_given_local_device_ids_must_be_visible():
  env = {**SLURM_TASK, 'CUDA_VISIBLE_DEVICES': '5'}
  with pytest.raises(
    DistributedConfigError, match=r"--local_device_ids='1' is not allowed: .*sees 1"
  ):
    plan_initialize(flags(local_device_ids='1'), env)
  assert plan_initialize(flags(local_device_ids='0'), env).local_device_ids == (0,)


@pytest.mark.parametrize(
  'value, count',
  [('0,1,2', 3), ('GPU-a,GPU-b', 2), ('', 0), ('NoDevFiles', 0), ('0,-1,2', 1), ('-1', 0)],
)
def test_visible_devices_are_counted_as_the_cuda_runtime_does(value, count):
  visible = distributed.cluster_env.visible_accelerators({'CUDA_VISIBLE_DEVICES': value}, 8)
  assert visible.count == count


@pytest.mark.parametrize(
  'env, tasks',
  [
    ({'SLURM_NODEID': '2', 'SLURM_STEP_TASKS_PER_NODE': '4(x2),2'}, 2),
    ({'SLURM_NODEID': '1', 'SLURM_TASKS_PER_NODE': '8(x2)'}, 8),
    ({'SLURM_NTASKS_PER_NODE': '4'}, 4),
    ({'SLURM_STEP_TASKS_PER_NODE': 'odd'}, None),
  ],
)
def test_slurm_tasks_on_this_node(env, tasks):
  assert distributed.cluster_env.LAUNCHERS[1].local_size(env) == tasks


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
    env=cpu_env(),
    timeout=300,
  )
  assert proc.returncode != 0
  assert '--num_processes, --process_id given without --coordinator_address' in proc.stderr
  assert not os.path.exists(tmp_path / 'config.json')  # failed before training started
