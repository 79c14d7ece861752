"""Entry point: `python -m stop_jax.main --config=configs/vith14.py --workdir=DIR`.

Any config key can be overridden on the command line, e.g. `--config.stop.sigma=0.1`; an
unknown key fails at once (the config is locked). All logic lives in `train/loop.py`.

Multi-host: on TPU pods and under SLURM (srun) or Open MPI (mpirun) the processes find each
other by themselves; elsewhere start one process per host with
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (see `distributed.py`).

Exit status: 0 when the run finished; `distributed.PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL) when a
SIGTERM stopped it after saving a checkpoint, i.e. "preempted: rerun the same command to resume";
2 for a user error (a bad config key or value, data not prepared, a checkpoint that does not
match), printed as one `error: ...` line (`--verbose` or STOP_JAX_TRACEBACK=1 adds the
traceback); anything else is a failure. Rerunning a finished run prints that it is already
complete and exits 0.
"""

import os

if __name__ == '__main__':
  # Before anything heavy is imported: may restart the process once, with huge-page malloc
  # (see host_devices.restart_with_hugepage_malloc).
  from stop_jax.runtime import host_devices

  host_devices.restart_with_hugepage_malloc()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from stop_jax.runtime import cli, distributed  # noqa: E402
from stop_jax.train import loop  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py[:arg]).')
flags.DEFINE_string('workdir', None, 'Run directory: config, metrics, TensorBoard, checkpoints.')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'HOST:PORT of process 0, for a multi-process run started by hand (with --num_processes and '
  '--process_id). Not needed on TPU pods, under SLURM or Open MPI.',
)
flags.DEFINE_integer('num_processes', None, 'Number of processes of a run started by hand.')
flags.DEFINE_integer('process_id', None, 'This process index in [0, num_processes).')
flags.DEFINE_list(
  'local_device_ids',
  None,
  'Local accelerators this process drives, e.g. 0,1,2,3 (multi-process runs only; default: '
  "JAX's choice, i.e. all of them, or the one of the local rank under SLURM/Open MPI).",
)
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if os.environ.get('GLIBC_TUNABLES'):
    logging.info('GLIBC_TUNABLES=%s (see host_devices.py)', os.environ['GLIBC_TUNABLES'])
  try:
    distributed.initialize({name: FLAGS[name].value for name in distributed.FLAG_NAMES})
  except distributed.DistributedConfigError as e:
    raise app.UsageError(str(e)) from e
  if jax.process_index() != 0:
    # Every host runs the same loop: one voice is enough (warnings still come from all).
    logging.set_verbosity(logging.WARNING)
  summary = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if summary.get('preempted'):
    logging.warning(
      'exiting with status %d (preempted at step %d, checkpoint saved): rerun to resume',
      distributed.PREEMPTED_EXIT_CODE,
      summary['steps'],
    )
    return distributed.PREEMPTED_EXIT_CODE
  # A finished run (summary['already_complete']) printed its one line and changed nothing.
  return 0


if __name__ == '__main__':
  cli.run(main)
