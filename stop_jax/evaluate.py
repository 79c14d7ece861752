r"""Evaluates a frozen target encoder with the protocols of the StoP paper.

  python -m stop_jax.evaluate --config=configs/eval/in1k_1pct.py --workdir=WORKDIR [--step=N]

WORKDIR is a pretraining run (its `config.json` and `checkpoints/`; the latest checkpoint unless
--step), a directory written by `stop_jax.eval.export`, or one written by `stop_jax.tools.convert`
(official PyTorch weights). The model is rebuilt from the config saved there; the eval config
(configs/eval/*.py) only contributes its `eval` group and seed.

Protocols (`eval.protocol`, see `stop_jax/eval/evaluators.py: PROTOCOLS`):
- logreg: StoP's IN-1k 1% protocol, L2-regularised multinomial logistic regression (L-BFGS) on
  standardised frozen features, l2 chosen on a held-out fifth of the train split (`logreg.py`).
- linear: the full linear probe of VISSL on augmented images (`linear.py`).
- knn: weighted k-NN on cosine similarity (`knn.py`).
- davis: DAVIS 2017 video object segmentation by label propagation, scored J&F (`davis.py`).

Every protocol runs on both feature types of `features.py` (avg-pooled last layer, and the
concatenation of the avg-pooled last 4 layers). Results go to WORKDIR/eval/<name>.json and one
summary line is printed (`stop_jax/eval/run.py`). Features of logreg/knn are cached in
WORKDIR/eval/cache, so a second evaluation of the same checkpoint on the same data (e.g. another
l2 grid) skips the encoder.

A user error (a missing workdir, a bad key, data not prepared) is one `error: ...` line and exit
status 2 (`--verbose` adds the traceback and the libraries' INFO logs).
"""

from __future__ import annotations

from absl import app, flags

from stop_jax.eval import run
from stop_jax.runtime import cli


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  run.evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.step)


def _define_flags():
  # Only when run as a program: importing this module must not claim flag names.
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file('config', None, 'An eval config (configs/eval/*.py[:arg]).')
  flags.DEFINE_string('workdir', None, 'A run directory, an export, or a converted checkpoint.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
