"""What a cluster launcher (Open MPI, SLURM) and the machine say about this process, read by one
table, and which local accelerators a launcher's task may drive. Pure but for `node_gpus`.

`distributed.plan_initialize` turns this into the call of `jax.distributed.initialize`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence

from stop_jax.runtime import cli

_NVIDIA_GPUS = '/proc/driver/nvidia/gpus'  # one entry per GPU of the node (the driver's view)
# What restricts the GPUs a process sees, in the order the CUDA / ROCm runtimes honour them.
_VISIBLE_VARS = ('CUDA_VISIBLE_DEVICES', 'ROCR_VISIBLE_DEVICES', 'HIP_VISIBLE_DEVICES')


class DistributedConfigError(cli.UserError, ValueError):
  """Flags or environment that do not describe a runnable multi-process job."""


def env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedConfigError(
      f'environment variable {name}={value!r} is not an integer.'
    ) from None


def require_env(environ: Mapping[str, str], names: Sequence[str], what: str, fix: str):
  missing = [n for n in names if n not in environ]
  if missing:
    raise DistributedConfigError(f'{what}, but {", ".join(missing)} is unset: {fix}')


def _slurm_tasks_on_node(environ: Mapping[str, str]) -> int | None:
  """Tasks of this job step on this node, from SLURM's compressed list ('4(x2),2') at its node."""
  node = env_int(environ, 'SLURM_NODEID')
  for name in ('SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'):
    counts = []
    for item in environ.get(name, '').split(','):
      match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', item.strip())
      if not match:
        counts = []
        break
      counts += [int(match.group(1))] * int(match.group(2) or 1)
    if counts:
      return counts[node] if node is not None and node < len(counts) else None
  return env_int(environ, 'SLURM_NTASKS_PER_NODE')


@dataclasses.dataclass(frozen=True)
class Launcher:
  """Where one cluster launcher puts a task's numbers: one row of `LAUNCHERS`.

  Attributes:
    name: JAX's `cluster_detection_method` for it.
    label: for messages.
    size, rank, local_rank: the variables holding the process count, this process's index and
      its index among the job's processes on this node.
    required: what JAX's detection needs besides those (it finds the coordinator from them).
    fix: what to do when one of them is missing.
    marker: a variable that must be set too for the launcher to count as present.
    local_size: the job's processes on this node, None when unknown.
    gpus_on_node: variable with the GPUs the job holds on this node, when the launcher sets one.
    where: extra words for the log line.
  """

  name: str
  label: str
  size: str
  rank: str
  local_rank: str
  required: tuple[str, ...]
  fix: str
  marker: str | None
  local_size: Callable[[Mapping[str, str]], int | None]
  gpus_on_node: str | None
  where: Callable[[Mapping[str, str]], str]


# Open MPI before SLURM, as JAX's detection: mpirun inside an allocation sets both.
LAUNCHERS = (
  Launcher(
    name='ompi',
    label='Open MPI',
    size='OMPI_COMM_WORLD_SIZE',
    rank='OMPI_COMM_WORLD_RANK',
    local_rank='OMPI_COMM_WORLD_LOCAL_RANK',
    required=('OMPI_MCA_orte_hnp_uri',),
    fix="JAX's Open MPI detection needs mpirun of Open MPI 4 or older; otherwise pass "
    '--coordinator_address=HOST0:PORT --num_processes=$OMPI_COMM_WORLD_SIZE '
    '--process_id=$OMPI_COMM_WORLD_RANK.',
    marker=None,
    local_size=lambda env: env_int(env, 'OMPI_COMM_WORLD_LOCAL_SIZE'),
    gpus_on_node=None,
    where=lambda env: '',
  ),
  Launcher(
    name='slurm',
    label='SLURM',
    size='SLURM_NTASKS',
    rank='SLURM_PROCID',
    local_rank='SLURM_LOCALID',
    required=('SLURM_STEP_NODELIST',),
    fix='this looks like the batch script itself, not one of its tasks. Start every task with '
    'srun (see launch/slurm.sbatch); for a one-process run inside an allocation use '
    '`srun --ntasks=1 ...`.',
    marker='SLURM_JOB_ID',
    local_size=_slurm_tasks_on_node,
    gpus_on_node='SLURM_GPUS_ON_NODE',
    where=lambda env: f' (job {env["SLURM_JOB_ID"]}) on nodes {env["SLURM_STEP_NODELIST"]}',
  ),
)


@dataclasses.dataclass(frozen=True)
class Visible:
  """The accelerators (GPUs) this process can see before JAX starts, and where that is from."""

  count: int
  source: str


def visible_accelerators(environ: Mapping[str, str], node_gpus: int | None) -> Visible | None:
  """From CUDA/ROCR/HIP_VISIBLE_DEVICES, else every GPU of the node; None when unknown."""
  for name in _VISIBLE_VARS:
    if name in environ:
      value = environ[name].strip()
      ids = [] if value in ('', 'NoDevFiles') else value.split(',')
      # The CUDA runtime ignores everything from the first invalid (negative) entry on.
      ids = ids[: next((i for i, x in enumerate(ids) if x.strip().startswith('-')), len(ids))]
      return Visible(len(ids), f'{name}={value}')
  if node_gpus is not None:
    return Visible(node_gpus, f'{node_gpus} GPUs in {_NVIDIA_GPUS}')
  return None


def cluster_device_ids(
  launcher: Launcher, environ: Mapping[str, str], visible: Visible | None, task: str
) -> tuple[int, ...] | None:
  """The local device ids a launcher's task drives: always ones it can see.

  Every task sees the node's GPUs (nothing bound them): its equal share, by local rank (one
  each when there are as many tasks as GPUs, all of them for one task per node). The launcher
  bound GPUs to each task (CUDA_VISIBLE_DEVICES differs per task, fewer than the node holds):
  all that it sees. Nothing visible (a CPU job) or unknown: JAX's default (the local rank's).
  """
  if visible is None or visible.count == 0:
    return None
  local_rank = env_int(environ, launcher.local_rank)
  local_size = launcher.local_size(environ)
  on_node = env_int(environ, launcher.gpus_on_node) if launcher.gpus_on_node else None
  if on_node is not None:
    shared = visible.count >= on_node
  else:  # without the job's GPU count, fewer GPUs than tasks can only mean bound ones
    shared = visible.count >= (local_size or 1)
  if not shared:
    return tuple(range(visible.count))
  per_task = visible.count // local_size if local_size else 1
  if local_size and visible.count % local_size or (local_rank + 1) * per_task > visible.count:
    raise DistributedConfigError(
      f'{task} (local rank {local_rank} of {local_size or "?"} on this node) cannot get an equal '
      f'share of the {visible.count} GPUs every task sees ({visible.source}): run one task per '
      f'GPU, or bind GPUs to tasks (e.g. srun --gpus-per-task=N), or pass --local_device_ids.'
    )
  return tuple(range(local_rank * per_task, (local_rank + 1) * per_task))


def node_gpus() -> int | None:
  """NVIDIA GPUs of this node as the driver lists them (whatever CUDA_VISIBLE_DEVICES says)."""
  try:
    return len(os.listdir(_NVIDIA_GPUS))
  except OSError:  # no NVIDIA driver: no GPUs we can count
    return None
