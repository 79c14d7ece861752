"""The paper's Figs. 4, 5 and 6 of a run as PNG files: what `python -m stop_jax.figures` runs.

`write_figures(workdir, out, baseline_workdir=...)` reads a run (local or gs://), builds every
figure with the functions below and saves them; the notebooks call the same builders:
  fig4_training.png    ||A||_F and ||b|| (StoP's mask token) along training, one line per run;
  fig4_sigma.png       the same at the end of training against sigma (the paper's Fig. 4), only
                       when the runs given span at least two sigma values;
  fig5_similarity.png  stochastic positions A n_j + b + psi_j against every psi_k, learned A and
                       random A, one column per sigma (`similarity_figure`);
  fig6_heatmaps_<i>.png  for image i: where the prediction at one masked patch points, one panel
                       per run (the run, then the baseline), at softmax temperature `temperature`
                       (`heatmaps.DEFAULT_TEMPERATURE`, whose comment says why);
  fig6_heatmaps.npz    the maps behind the Fig. 6 PNGs ([runs, images, h, w]) with their masks.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Mapping, Sequence

import jax
import matplotlib.pyplot as plt
import numpy as np

from stop_jax.runtime import cli, fileio
from stop_jax.tools.analysis import heatmaps, regularisation, runs, similarity

SIMILARITY_SIGMAS = (0.0, 0.25, 1.0, 4.0)  # Fig. 5 columns: noise standard deviations
NUM_IMAGES = 3  # Fig. 6: first images of the run's evaluation split
DPI = 120


class FiguresError(cli.UserError, ValueError):
  """A user error: the run cannot be drawn as asked (the message says why and what to do)."""


def require_run(workdir: str, flag: str = '--workdir') -> None:
  """Raises FiguresError unless `workdir` is a training run with a saved checkpoint."""
  if not workdir:
    raise FiguresError(f'{flag} is empty: pass the run directory of a training run.')
  if not fileio.isdir(workdir):
    raise FiguresError(
      f'{flag}={workdir} does not exist: pass the --workdir of a training run '
      '(python -m stop_jax.main --config=... --workdir=...).'
    )
  if not fileio.exists(os.path.join(workdir, 'config.json')):
    raise FiguresError(f'{flag}={workdir} has no config.json: it is not a training run directory.')
  if not runs.has_checkpoint(workdir):
    raise FiguresError(
      f'{flag}={workdir} has no checkpoint in {os.path.join(workdir, "checkpoints")}: train it '
      'first, or wait for its first save (checkpoint.every_steps).'
    )


def run_label(run: runs.Run) -> str:
  """'StoP (sigma=0.25), step 30' / 'I-JEPA, step 30': a panel title for a run."""
  stop = run.config.stop
  if stop.mode == 'off':
    name = 'I-JEPA'
  elif stop.mode == 'masked':
    name = f'StoP (sigma={stop.sigma:g})'
  else:
    name = f'stop.mode={stop.mode} (sigma={stop.sigma:g})'
  return f'{name}, step {run.step}'


def compared_runs(run: runs.Run, baseline: runs.Run | None = None) -> dict[str, runs.Run]:
  """Title -> run, the run first; the baseline must share the run's patch grid and image size."""
  compared = {run_label(run): run}
  if baseline is None:
    return compared
  size, base_size = run.config.model.image_size, baseline.config.model.image_size
  if baseline.grid != run.grid or base_size != size:
    raise FiguresError(
      f'--baseline_workdir={baseline.workdir} has {base_size}px images on a {baseline.grid} patch '
      f'grid, the run {size}px on {run.grid}: Fig. 6 compares runs at the same resolution.'
    )
  title = run_label(baseline)
  compared[title if title not in compared else f'{title} (baseline)'] = baseline
  return compared


def regularisation_figures(workdirs: Sequence[str]) -> dict[str, plt.Figure]:
  """Fig. 4: 'fig4_training' always; 'fig4_sigma' when the runs span two or more sigmas."""
  keys = ('A_norm', 'A_bias_norm')
  figures = {'fig4_training': regularisation.plot_metric_curves(workdirs, keys)}
  table = regularisation.regularisation_table(workdirs, keys)
  if len(set(table['sigma'].tolist())) > 1:
    figures['fig4_sigma'] = regularisation.plot_regularisation(table, keys)
  return figures


def similarity_figure(
  run: runs.Run,
  sigmas: Sequence[float] = SIMILARITY_SIGMAS,
  seed: int = 0,
  num_samples: int = 256,
  metric: str = 'cosine',
) -> tuple[plt.Figure, np.ndarray]:
  """Fig. 5: the run's learned A next to a random A, one column per sigma.

  Returns:
    The Figure and its maps, float32 [2 * len(sigmas), Q, h, w] (learned columns first).
  """
  a_learned, b_learned = run.projection()
  a_random, b_random = similarity.random_projection(jax.random.key(seed), *a_learned.shape)
  queries = similarity.default_queries(run.grid)
  maps = [
    similarity.position_similarity_maps(
      a,
      b,
      run.positions(),
      run.grid,
      queries,
      sigmas,
      jax.random.key(seed + 1),
      num_samples,
      metric,
    )
    for a, b in ((a_learned, b_learned), (a_random, b_random))
  ]
  titles = [f'{which} A, sigma={s:g}' for which in ('learned', 'random') for s in sigmas]
  maps = np.concatenate(maps)
  title = f'{metric} similarity of A n + b + psi_j to every psi_k; {run_label(run)}'
  return similarity.plot_similarity_maps(maps, run.grid, queries, titles, title), maps


def heatmap_figures(
  compared: Mapping[str, runs.Run],
  images,
  temperature: float = heatmaps.DEFAULT_TEMPERATURE,
  seed: int = 0,
  noise_draws: int = 0,
) -> tuple[list[plt.Figure], list[heatmaps.HeatmapPanel]]:
  """Fig. 6: one figure per image, the masked image then one heatmap per run (and noise draw).

  Args:
    compared: title -> run (`compared_runs`); the masks come from the first run's settings.
    images: normalised [N, H, W, 3].
    temperature, seed, noise_draws: as for `heatmaps.heatmap_panels`.
  Returns:
    N Figures and their N panels (maps and masks).
  """
  panels = heatmaps.heatmap_panels(compared, images, temperature, seed, noise_draws)
  grid_w = next(iter(compared.values())).grid[1]
  figures = []
  for i, panel in enumerate(panels):
    fig = heatmaps.plot_prediction_heatmaps(
      panel.image, panel.ctx_mask, panel.tgt_mask, panel.patch, panel.maps
    )
    fig.suptitle(
      f'image {i}, patch {divmod(panel.patch, grid_w)}, softmax temperature {temperature:g}'
    )
    figures.append(fig)
  return figures, panels


def save_figure(fig: plt.Figure, out: str, name: str) -> str:
  """Writes `fig` as `out/name.png` (local or gs://), closes it, returns the path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=DPI)
  plt.close(fig)
  path = os.path.join(out, f'{name}.png')
  fileio.write_bytes(path, buffer.getvalue())
  return path


def _save_heatmap_arrays(panels, titles, out: str) -> str:
  buffer = io.BytesIO()
  np.savez(
    buffer,
    maps=np.stack([np.stack([p.maps[t] for p in panels]) for t in titles]),  # [R, N, h, w]
    titles=np.array(titles),
    patches=np.array([p.patch for p in panels]),
    ctx_masks=np.stack([p.ctx_mask for p in panels]),
    tgt_masks=np.stack([p.tgt_mask for p in panels]),
  )
  path = os.path.join(out, 'fig6_heatmaps.npz')
  fileio.write_bytes(path, buffer.getvalue())
  return path


def write_figures(
  workdir: str,
  out: str,
  baseline_workdir: str | None = None,
  sigma_workdirs: Sequence[str] = (),
  temperature: float = heatmaps.DEFAULT_TEMPERATURE,
  num_images: int = NUM_IMAGES,
  seed: int = 0,
  data_dir: str | None = None,
) -> list[str]:
  """Figs. 4, 5 and 6 of the run in `workdir` (module docstring) into `out`; returns the paths.

  Args:
    workdir: the run (StoP), with a checkpoint; its latest one is drawn.
    out: output directory (created; local or gs://).
    baseline_workdir: optional run (e.g. I-JEPA, stop.mode=off) at the same resolution: Fig. 6
      shows it next to the run, and Fig. 4 adds its line.
    sigma_workdirs: more runs for Fig. 4 (e.g. the run's sigma sweep).
    temperature: Fig. 6 softmax temperature, > 0.
    num_images: Fig. 6 images, >= 1.
    seed: masks and noise draws.
    data_dir: where the Fig. 6 images are when not at the run's own `data.data_dir` (a run
      trained on a pod, drawn elsewhere).
  Raises:
    FiguresError: a run is missing or has no checkpoint, runs do not match, or a bad argument.
  """
  if not temperature > 0:
    raise FiguresError(f'--temperature={temperature} is not allowed: a softmax temperature > 0.')
  if num_images < 1:
    raise FiguresError(f'--num_images={num_images} is not allowed: at least 1.')
  require_run(workdir)
  if baseline_workdir:
    require_run(baseline_workdir, '--baseline_workdir')
  for path in sigma_workdirs:
    if not fileio.exists(os.path.join(path, 'metrics.jsonl')):
      raise FiguresError(f'--sigma_workdirs: {path} has no metrics.jsonl (not a training run).')
  run = runs.load_run(workdir)
  baseline = runs.load_run(baseline_workdir) if baseline_workdir else None
  compared = compared_runs(run, baseline)
  fileio.makedirs(out)
  curve_runs = list(dict.fromkeys([workdir, *([baseline_workdir] if baseline else [])]))
  curve_runs += [w for w in sigma_workdirs if w not in curve_runs]
  written = [
    save_figure(fig, out, name) for name, fig in regularisation_figures(curve_runs).items()
  ]
  written.append(save_figure(similarity_figure(run, seed=seed)[0], out, 'fig5_similarity'))
  # The probe-data reader imports TensorFlow: only loaded once everything above worked.
  from stop_jax.data import probe_arrays

  data_config = copy.deepcopy(run.config)
  if data_dir:
    data_config.data.data_dir = data_dir
  images, _ = probe_arrays.load_eval_arrays(data_config, 'test', num_images)
  figures, panels = heatmap_figures(compared, images, temperature, seed)
  written += [save_figure(fig, out, f'fig6_heatmaps_{i}') for i, fig in enumerate(figures)]
  written.append(_save_heatmap_arrays(panels, list(compared), out))
  return written
