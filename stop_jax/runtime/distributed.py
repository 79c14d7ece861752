"""Multi-process start-up: whether and how to call `jax.distributed.initialize`.

One process drives all the accelerators of a host (or, under SLURM/Open MPI, one per task); a
multi-host run is several such processes that must meet before anything touches a device. Where
they meet is decided here, in this order:

1. `--coordinator_address/--num_processes/--process_id` flags, all three or none: used as given
   and JAX's cluster detection is switched off, on any machine.
2. Open MPI (`mpirun`, OMPI_COMM_WORLD_SIZE > 1) and SLURM (`srun`, SLURM_JOB_ID with
   SLURM_NTASKS > 1): JAX's own cluster detection finds the coordinator; each task gets the
   GPU whose index is its local rank unless `--local_device_ids` says otherwise.
3. A multi-worker Cloud TPU VM (pod slice, or several slices): JAX's TPU detection.
4. Otherwise a single process: no distributed runtime at all.

`plan_initialize` makes the decision from flag values and an environment and is pure (the tests
feed it fake clusters); `initialize` gathers the facts, performs the plan and logs the outcome.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import urllib.request
from collections.abc import Mapping, Sequence

import jax
from absl import logging

# The flag names, as main.py defines them and plan_initialize reads them.
FLAG_NAMES = ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')
_TOGETHER = FLAG_NAMES[:3]

_GOOGLE_PCI_VENDOR = '0x1ae0'  # Cloud TPU chips show up as PCI devices of this vendor.
_METADATA_URL = 'http://metadata.google.internal/computeMetadata/v1/instance/attributes/'


class DistributedConfigError(ValueError):
  """Flags or environment that do not describe a runnable multi-process job."""


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """How to call `jax.distributed.initialize`, and why.

  Attributes:
    source: 'flags', 'ompi', 'slurm' or 'tpu': what decided that this is a multi-process run.
    description: one line for the log, e.g. 'SLURM job 42: task 3 of 16'.
    coordinator_address: 'host:port' of process 0, or None for JAX's detection to find it.
    num_processes: the process count when known before initialising (TPU: None, JAX finds it).
    process_id: this process's index when known before initialising.
    local_device_ids: the local accelerators this process drives, or None for JAX's default
      (under SLURM/Open MPI: the one whose index is the local rank; elsewhere: all of them).
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


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedConfigError(
      f'environment variable {name}={value!r} is not an integer.'
    ) from None


def _require_env(environ: Mapping[str, str], names: Sequence[str], what: str, fix: str):
  missing = [n for n in names if n not in environ]
  if missing:
    raise DistributedConfigError(f'{what}, but {", ".join(missing)} is unset: {fix}')


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


def _ompi_plan(environ, local_ids) -> InitPlan | None:
  size = _env_int(environ, 'OMPI_COMM_WORLD_SIZE')
  if size is None or size <= 1:
    return None
  _require_env(
    environ,
    ('OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK'),
    f'Open MPI runs {size} processes (OMPI_COMM_WORLD_SIZE)',
    "JAX's Open MPI detection needs mpirun of Open MPI 4 or older; otherwise pass "
    '--coordinator_address=HOST0:PORT --num_processes=$OMPI_COMM_WORLD_SIZE '
    '--process_id=$OMPI_COMM_WORLD_RANK.',
  )
  rank = _env_int(environ, 'OMPI_COMM_WORLD_RANK')
  return InitPlan(
    source='ompi',
    description=f'Open MPI: rank {rank} of {size}',
    num_processes=size,
    process_id=rank,
    local_device_ids=local_ids,
    cluster_detection_method='ompi',
  )


def _slurm_plan(environ, local_ids) -> InitPlan | None:
  ntasks = _env_int(environ, 'SLURM_NTASKS')
  if 'SLURM_JOB_ID' not in environ or ntasks is None or ntasks <= 1:
    return None
  _require_env(
    environ,
    ('SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID'),
    f'SLURM job {environ["SLURM_JOB_ID"]} has {ntasks} tasks (SLURM_NTASKS)',
    'this looks like the batch script itself, not one of its tasks. Start every task with '
    'srun (see launch/slurm.sbatch); for a one-process run inside an allocation use '
    '`srun --ntasks=1 ...`.',
  )
  procid = _env_int(environ, 'SLURM_PROCID')
  return InitPlan(
    source='slurm',
    description=(
      f'SLURM job {environ["SLURM_JOB_ID"]}: task {procid} of {ntasks} on nodes '
      f'{environ["SLURM_STEP_NODELIST"]}'
    ),
    num_processes=ntasks,
    process_id=procid,
    local_device_ids=local_ids,
    cluster_detection_method='slurm',
  )


def _tpu_plan(environ, tpu_vm_workers: int | None) -> InitPlan | None:
  # GKE puts the slice's hosts in the environment; on a TPU VM they are in the metadata.
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES')
  per_slice = len(hosts.split(',')) if hosts else tpu_vm_workers
  if not per_slice:
    return None
  slices = _env_int(environ, 'MEGASCALE_NUM_SLICES') or 1
  if per_slice * slices <= 1:
    return None
  where = 'GKE' if hosts else 'TPU VM'
  return InitPlan(
    source='tpu',
    description=f'Cloud TPU ({where}): {per_slice} hosts per slice x {slices} slice(s)',
  )


def plan_initialize(
  flags_values: Mapping, environ: Mapping[str, str], *, tpu_vm_workers: int | None = None
) -> InitPlan | None:
  """Decides whether and how this process joins a multi-process JAX run. Pure.

  Args:
    flags_values: FLAG_NAMES -> values, None (or '') when not given; `local_device_ids` may be a
      comma-separated string or a sequence.
    environ: the process environment (os.environ, or a fake one).
    tpu_vm_workers: number of workers of this Cloud TPU VM slice from its metadata server, None
      when this is not a TPU VM.
  Returns:
    The plan, or None for a single-process run.
  Raises:
    DistributedConfigError naming the bad flag or variable and what is allowed.
  """
  unknown = set(flags_values) - set(FLAG_NAMES)
  if unknown:
    raise DistributedConfigError(f'unknown keys {sorted(unknown)}; allowed: {FLAG_NAMES}.')
  local_ids = _parse_device_ids(flags_values.get('local_device_ids'))
  plan = (
    _explicit_plan(flags_values, local_ids)
    # Open MPI before SLURM, as JAX's detection: mpirun inside an allocation sets both.
    or _ompi_plan(environ, local_ids)
    or _slurm_plan(environ, local_ids)
    or _tpu_plan(environ, tpu_vm_workers)
  )
  if plan is None and local_ids is not None:
    raise DistributedConfigError(
      f'--local_device_ids={flags_values["local_device_ids"]!r} only applies to a multi-process '
      'run (explicit flags, SLURM or Open MPI); a single process uses every visible device '
      '(restrict them with CUDA_VISIBLE_DEVICES).'
    )
  if plan is not None and plan.source == 'tpu' and local_ids is not None:
    raise DistributedConfigError(
      '--local_device_ids is not allowed on a TPU pod: each host drives all its chips.'
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

  Logs this process's index and count and its local and global devices, on every process.

  Returns:
    The plan that was carried out, or None for a single process.
  """
  environ = os.environ if environ is None else environ
  plan = plan_initialize(flags_values, environ, tpu_vm_workers=_tpu_vm_workers())
  if plan is None:
    logging.info('single process: no jax.distributed start-up.')
  else:
    logging.info('jax.distributed.initialize: %s', plan.description)
    # Cross-process collectives on the CPU backend (tests, laptops, CPU clusters) need an
    # implementation; gloo ships with jaxlib. Recent JAX defaults to it: keep a user's choice.
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**plan.initialize_kwargs())
  local = jax.local_devices()
  logging.info(
    'process %d of %d: %d local devices (%s), %d global devices',
    jax.process_index(),
    jax.process_count(),
    len(local),
    ', '.join(sorted({d.device_kind for d in local})),
    jax.device_count(),
  )
  return plan
