r"""Fine-tunes a pretrained encoder end to end on a labelled set (paper Table 5).

  python -m stop_jax.finetune --config=configs/finetune/in1k_1pct_vitl16.py --workdir=DIR \
    --config.finetune.init=PRETRAIN_RUN [--config.finetune.data_dir=TFDS_DIR]

PRETRAIN_RUN is a pretraining run, an export (`stop_jax.eval.export`) or a converted official
checkpoint (`stop_jax.tools.convert`); its target encoder and architecture are used. The recipe
(AdamW, layer-wise LR decay, drop path, label smoothing, Mixup/CutMix, RandAugment, warmup +
cosine) is the `finetune` config group. Rerunning the same command resumes. All logic lives in
`stop_jax/train/finetune_loop.py`. Exit status as `stop_jax.main`: 0 done, 75 preempted (saved).
"""

from absl import app, flags

from stop_jax.runtime import cli, distributed
from stop_jax.train import finetune_loop


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  try:
    distributed.initialize({name: FLAGS[name].value for name in distributed.FLAG_NAMES})
  except distributed.DistributedConfigError as e:
    raise app.UsageError(str(e)) from e
  summary = finetune_loop.finetune(FLAGS.config, FLAGS.workdir)
  if summary.get('preempted'):
    return distributed.PREEMPTED_EXIT_CODE
  return 0


def _define_flags():
  # Only when run as a program: importing this module must not claim flag names.
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file('config', None, 'A fine-tuning config (configs/finetune/*.py).')
  flags.DEFINE_string('workdir', None, 'Run directory: config, metrics, checkpoints, summary.')
  flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 (multi-process by hand).'
  )
  flags.DEFINE_integer('num_processes', None, 'Number of processes of a run started by hand.')
  flags.DEFINE_integer('process_id', None, 'This process index in [0, num_processes).')
  flags.DEFINE_list('local_device_ids', None, 'Local accelerators this process drives.')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
