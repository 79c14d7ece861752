r"""Writes the paper's Figs. 4, 5 and 6 of a run as PNG files, without a notebook.

  python -m stop_jax.figures --workdir=RUN [--baseline_workdir=IJEPA_RUN] --out=DIR \
    [--sigma_workdirs=RUN_A,RUN_B] [--temperature=0.1] [--num_images=3] [--seed=0] \
    [--data_dir=DATA_DIR]

RUN (local or gs://) is a training run with a checkpoint; its latest checkpoint is drawn. Into
DIR (created; local or gs://) go `fig4_training.png` (||A||_F and ||b|| along training),
`fig4_sigma.png` (the same against sigma, when RUN, the baseline and --sigma_workdirs span two
or more sigmas), `fig5_similarity.png` (stochastic against fixed positions, learned and random
A) and `fig6_heatmaps_<i>.png` per image (where the prediction at a masked patch points: RUN,
then the baseline side by side; the first images of the run's evaluation split, read from its
`data.data_dir` or --data_dir), with the maps in `fig6_heatmaps.npz`. Fig. 6 divides the
cosine similarities by --temperature before the softmax (default 0.1; at 1 the maps are nearly
uniform: `stop_jax/tools/analysis/heatmaps.py: DEFAULT_TEMPERATURE` says why). Every figure is
built by `stop_jax/tools/analysis/figures.py`, which the notebooks call too.

A user error (a missing run, no checkpoint yet, runs at different resolutions) is one
`error: ...` line and exit status 2 (`--verbose` adds the traceback).
"""

from __future__ import annotations

from absl import app, flags

from stop_jax.runtime import cli


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Matplotlib draws to files only; the heavy imports (JAX, the models) wait until the flags
  # parsed, so that --help and flag errors answer at once.
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  from stop_jax.tools.analysis import figures  # noqa: PLC0415

  f = flags.FLAGS
  written = figures.write_figures(
    f.workdir,
    f.out,
    baseline_workdir=f.baseline_workdir,
    sigma_workdirs=f.sigma_workdirs or (),
    temperature=f.temperature,
    num_images=f.num_images,
    seed=f.seed,
    data_dir=f.data_dir,
  )
  for path in written:
    print(path)
  return 0


def _define_flags():
  # Only when run as a program: importing this module must not claim flag names.
  flags.DEFINE_string('workdir', None, 'The run to draw (local or gs://), with a checkpoint.')
  flags.DEFINE_string('out', None, 'Directory for the PNG files (created; local or gs://).')
  flags.DEFINE_string(
    'baseline_workdir', None, 'A run to show next to it in Fig. 6 (e.g. I-JEPA, stop.mode=off).'
  )
  flags.DEFINE_list('sigma_workdirs', None, 'More runs for Fig. 4 (e.g. a sigma sweep).')
  flags.DEFINE_float(
    'temperature', 0.1, 'Fig. 6 softmax temperature on cosine similarities (> 0; see heatmaps.py).'
  )
  flags.DEFINE_integer('num_images', 3, "Fig. 6: images of the run's evaluation split.")
  flags.DEFINE_integer('seed', 0, 'Masks and noise draws.')
  flags.DEFINE_string(
    'data_dir', None, "Fig. 6 images' data.data_dir, when not the run's own (e.g. another host)."
  )
  flags.mark_flags_as_required(['workdir', 'out'])


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
