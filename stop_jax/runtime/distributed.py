"""Multi-process start-up (whether and how to call `jax.distributed.initialize`) and exit codes.

One process drives all the accelerators of a host (or, under SLURM/Open MPI, its share of them);
a multi-host run is several such processes that must meet before anything touches a device.
Where they meet is decided here, in this order:

1. `--coordinator_address/--num_processes/--process_id` flags, all three or none: used as given
   and JAX's cluster detection is switched off, on any machine.
2. Open MPI (`mpirun`, OMPI_COMM_WORLD_SIZE > 1) and SLURM (`srun`, SLURM_JOB_ID with
   SLURM_NTASKS > 1), read by one table (`cluster_env.LAUNCHERS`): JAX's own cluster detection
   finds the coordinator, and each task drives accelerators it can see
   (`cluster_env.cluster_device_ids`).
3. A multi-worker Cloud TPU VM (pod slice, or several slices): JAX's TPU detection.
4. Otherwise a single process: no distributed runtime at all.

`plan_initialize` makes the decision from flag values, an environment and a few machine facts
and is pure (the tests feed it fake clusters); `initialize` gathers the facts, performs the plan
and logs the outcome. The slices of a multislice run are counted from the devices afterwards
(`sharding.find_slices`), not from the environment.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import urllib.request
from collections.abc import Mapping

import jax
from absl import logging

from stop_jax.runtime import cluster_env
from stop_jax.runtime.cluster_env import DistributedConfigError

# Exit status of `python -m stop_jax.main` when a SIGTERM stopped the run and it saved a
# checkpoint first: "preempted, resume me" (sysexits.h EX_TEMPFAIL); launchers requeue on it.
# A finished run exits 0; anything else is a failure.
PREEMPTED_EXIT_CODE = 75

# The flag names, as main.py defines them and plan_initialize reads them.
FLAG_NAMES = ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')
_TOGETHER = FLAG_NAMES[:3]

_GOOGLE_PCI_VENDOR = '0x1ae0'  # Cloud TPU chips show up as PCI devices of this vendor.
_METADATA_URL = 'http://metadata.google.internal/computeMetadata/v1/instance/attributes/'


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """How to call `jax.distributed.initialize`, and why.

  Attributes:
    source: 'flags', 'ompi', 'slurm' or 'tpu': what decided that this is a multi-process run.
    description: one line for the log, e.g. 'SLURM task 3 of 16 (job 42) on nodes gpu[1-2]'.
    coordinator_address: 'host:port' of process 0, or None for JAX's detection to find it.
    num_processes: the process count when known before initialising (TPU: None, JAX finds it).
    process_id: this process's index when known before initialising.
    local_device_ids: the local accelerators this process drives, or None for JAX's default
      (under SLURM/Open MPI: the one whose index is the local rank; elsewhere: all of them).
      Under SLURM/Open MPI, from what the task can see (`cluster_env.cluster_device_ids`).
    cluster_detection_method: passed to JAX: 'deactivate' for explicit flags, the cluster's
      name under SLURM/Open MPI, None on TPU (JAX picks its GCE or GKE TPU variant).
  """

  source: str
  description: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  cluster_detection_method: str | None = None

  def initialize_kwargs(self) -> dict:
    """Keyword arguments for `jax.distributed.initialize`."""
    return {
      'coordinator_address': self.coordinator_address,
      'num_processes': self.num_processes,
      'process_id': self.process_id,
      'local_device_ids': list(self.local_device_ids) if self.local_device_ids else None,
      'cluster_detection_method': self.cluster_detection_method,
    }


def _parse_device_ids(value) -> tuple[int, ...] | None:
  """'0,1' / ['0', '1'] / [0, 1] / None -> (0, 1) / None, refusing anything else."""
  if value is None or value == '' or value == []:
    return None
  items = value.split(',') if isinstance(value, str) else list(value)
  try:
    ids = tuple(int(str(x).strip()) for x in items)
  except ValueError:
    raise DistributedConfigError(
      f'--local_device_ids={value!r} is not allowed: a comma-separated list of local device '
      'indices, e.g. 0,1,2,3.'
    ) from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise DistributedConfigError(
      f'--local_device_ids={value!r} is not allowed: distinct non-negative device indices.'
    )
  return ids


def _check_address(address: str):
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedConfigError(
      f'--coordinator_address={address!r} is not allowed: HOST:PORT with a port in 1..65535 '
      '(process 0 listens there), e.g. 10.0.0.1:1234 or localhost:12345.'
    )


def _explicit_plan(flags_values: Mapping, local_ids) -> InitPlan | None:
  given = [n for n in _TOGETHER if flags_values.get(n) not in (None, '')]
  if not given:
    return None
  if len(given) < len(_TOGETHER):
    missing = [n for n in _TOGETHER if n not in given]
    raise DistributedConfigError(
      f'{", ".join("--" + n for n in given)} given without {", ".join("--" + n for n in missing)}:'
      ' a multi-process run started by hand needs all three of --coordinator_address, '
      '--num_processes and --process_id (under SLURM, Open MPI or on a TPU pod give none of '
      'them: JAX detects them).'
    )
  address = flags_values['coordinator_address']
  num, pid = flags_values['num_processes'], flags_values['process_id']
  _check_address(address)
  if not isinstance(num, int) or num < 1:
    raise DistributedConfigError(f'--num_processes={num!r} is not allowed: a positive integer.')
  if not isinstance(pid, int) or not 0 <= pid < num:
    raise DistributedConfigError(
      f'--process_id={pid!r} is not allowed: an integer in [0, {num}) for --num_processes={num}.'
    )
  return InitPlan(
    source='flags',
    description=f'process {pid} of {num} (flags), coordinator {address}',
    coordinator_address=address,
    num_processes=num,
    process_id=pid,
    local_device_ids=local_ids,
    # What the flags say is what runs, even inside a SLURM or MPI job.
    cluster_detection_method='deactivate',
  )


def _launcher_plan(launcher: cluster_env.Launcher, environ, local_ids, visible) -> InitPlan | None:
  size = cluster_env.env_int(environ, launcher.size)
  if size is None or size <= 1 or (launcher.marker and launcher.marker not in environ):
    return None
  cluster_env.require_env(
    environ,
    (*launcher.required, launcher.rank, launcher.local_rank),
    f'{launcher.label} runs {size} processes ({launcher.size})',
    launcher.fix,
  )
  rank = cluster_env.env_int(environ, launcher.rank)
  task = f'{launcher.label} task {rank} of {size}'
  ids = (
    local_ids
    if local_ids is not None
    else cluster_env.cluster_device_ids(launcher, environ, visible, task)
  )
  return InitPlan(
    source=launcher.name,
    description=task + launcher.where(environ),
    num_processes=size,
    process_id=rank,
    local_device_ids=ids,
    cluster_detection_method=launcher.name,
  )


def _tpu_plan(environ, tpu_vm_workers: int | None) -> InitPlan | None:
  # GKE puts the slice's hosts in the environment; on a TPU VM they are in the metadata.
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES')
  per_slice = len(hosts.split(',')) if hosts else tpu_vm_workers
  if not per_slice:
    return None
  slices = cluster_env.env_int(environ, 'MEGASCALE_NUM_SLICES') or 1
  if per_slice * slices <= 1:
    return None
  where = 'GKE' if hosts else 'TPU VM'
  return InitPlan(
    source='tpu',
    description=f'Cloud TPU ({where}): {per_slice} hosts per slice x {slices} slice(s)',
  )


def plan_initialize(
  flags_values: Mapping,
  environ: Mapping[str, str],
  *,
  tpu_vm_workers: int | None = None,
  node_gpus: int | None = None,
) -> InitPlan | None:
  """Decides whether and how this process joins a multi-process JAX run. Pure.

  Args:
    flags_values: FLAG_NAMES -> values, None (or '') when not given; `local_device_ids` may be a
      comma-separated string or a sequence.
    environ: the process environment (os.environ, or a fake one).
    tpu_vm_workers: number of workers of this Cloud TPU VM slice from its metadata server, None
      when this is not a TPU VM.
    node_gpus: the NVIDIA GPUs of this node as the driver lists them, None when unknown.
  Returns:
    The plan, or None for a single-process run.
  Raises:
    DistributedConfigError naming the bad flag or variable and what is allowed.
  """
  unknown = set(flags_values) - set(FLAG_NAMES)
  if unknown:
    raise DistributedConfigError(f'unknown keys {sorted(unknown)}; allowed: {FLAG_NAMES}.')
  local_ids = _parse_device_ids(flags_values.get('local_device_ids'))
  visible = cluster_env.visible_accelerators(environ, node_gpus)
  plan = _explicit_plan(flags_values, local_ids)
  for launcher in cluster_env.LAUNCHERS:
    plan = plan or _launcher_plan(launcher, environ, local_ids, visible)
  plan = plan or _tpu_plan(environ, tpu_vm_workers)
  given = flags_values.get('local_device_ids')
  if plan is None and local_ids is not None:
    raise DistributedConfigError(
      f'--local_device_ids={given!r} only applies to a multi-process run (explicit flags, SLURM '
      'or Open MPI); a single process uses every visible device (restrict them with '
      'CUDA_VISIBLE_DEVICES).'
    )
  if plan is not None and plan.source == 'tpu' and local_ids is not None:
    raise DistributedConfigError(
      '--local_device_ids is not allowed on a TPU pod: each host drives all its chips.'
    )
  if local_ids is not None and visible is not None and max(local_ids) >= visible.count:
    raise DistributedConfigError(
      f'--local_device_ids={given!r} is not allowed: this process sees {visible.count} '
      f'accelerator(s) ({visible.source}), so ids in [0, {visible.count}).'
    )
  return plan


def _tpu_vm_workers() -> int | None:
  """Workers in this Cloud TPU VM slice (from the metadata server), None off TPU VMs."""

  def is_google_device(vendor_file):
    try:
      return pathlib.Path(vendor_file).read_text().strip() == _GOOGLE_PCI_VENDOR
    except OSError:  # an unreadable PCI entry is no TPU
      return False

  has_tpu = any(map(is_google_device, glob.glob('/sys/bus/pci/devices/*/vendor')))
  if not has_tpu or os.environ.get('TPU_SKIP_MDS_QUERY'):
    return None
  request = urllib.request.Request(
    _METADATA_URL + 'worker-network-endpoints', headers={'Metadata-Flavor': 'Google'}
  )
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      endpoints = response.read().decode().strip()
  except OSError as e:  # TPU chips but no GCE metadata server: a custom host, not a TPU VM.
    logging.warning('TPU chips found but no TPU VM metadata (%s): single-host start-up.', e)
    return None
  return len(endpoints.split(',')) if endpoints else None


def initialize(flags_values: Mapping, environ: Mapping[str, str] | None = None) -> InitPlan | None:
  """Joins the multi-process run the flags/environment describe; call before touching devices.

  Logs this process's index and count, its local and global devices and, on TPU, the slices
  they span, on every process.

  Returns:
    The plan that was carried out, or None for a single process.
  """
  from stop_jax.runtime import sharding  # noqa: PLC0415 (flax: only once the run starts)

  environ = os.environ if environ is None else environ
  plan = plan_initialize(
    flags_values, environ, tpu_vm_workers=_tpu_vm_workers(), node_gpus=cluster_env.node_gpus()
  )
  if plan is None:
    logging.info('single process: no jax.distributed start-up.')
  else:
    ids = plan.local_device_ids
    logging.info(
      'jax.distributed.initialize: %s; local devices %s',
      plan.description,
      ','.join(map(str, ids)) if ids else "JAX's default",
    )
    # Cross-process collectives on the CPU backend (tests, laptops, CPU clusters) need an
    # implementation; gloo ships with jaxlib. Recent JAX defaults to it: keep a user's choice.
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**plan.initialize_kwargs())
  local = jax.local_devices()
  slices = sharding.find_slices(jax.devices())
  logging.info(
    'process %d of %d: %d local devices (%s), %d global devices%s',
    jax.process_index(),
    jax.process_count(),
    len(local),
    ', '.join(sorted({d.device_kind for d in local})),
    jax.device_count(),
    '' if slices.by_process else f' in {slices.count} slice(s)',
  )
  expected = cluster_env.env_int(environ, 'MEGASCALE_NUM_SLICES')
  if expected is not None and not slices.by_process and expected != slices.count:
    logging.warning(
      'MEGASCALE_NUM_SLICES=%d but the devices span %d slices (%s): the mesh follows the devices.',
      expected,
      slices.count,
      slices.what,
    )
  return plan
