"""Entry point: `python -m stop_jax.main --config=configs/vith14.py --workdir=DIR`.

Any config key can be overridden on the command line, e.g. `--config.stop.sigma=0.1`; an
unknown key fails at once (the config is locked). All logic lives in `trainer.py`.
"""

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from stop_jax import trainer

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py[:arg]).')
flags.DEFINE_string('workdir', None, 'Run directory: config, metrics, TensorBoard, checkpoints.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def _quiet_libraries(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the training log (warnings still show)."""
  return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_libraries)
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
