"""Paper Fig. 4: StoP regularises A, read from runs that differ in sigma.

`regularisation_table`: ||A||_F and ||b|| (b is StoP's mask token m~) at the end of each run,
read from its `metrics.jsonl` and `config.json`; `plot_regularisation` draws them against sigma,
`plot_metric_curves` along training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from stop_jax import config as config_lib
from stop_jax.runtime import fileio

# Axis labels of the metrics the plots show; other keys are labelled by their name.
METRIC_LABELS = {
  'A_norm': r'$\|A\|_F$',
  'A_bias_norm': r'$\|\tilde{m}\| = \|b\|$',
  'noise_to_pos': r'$\|A n\| / \|\psi\|$',
}


def read_metrics(workdir: str) -> list[dict]:
  """Every line of `workdir/metrics.jsonl`, in file order (a resumed run appends)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  try:
    text = fileio.read_text(path)  # local or an object store (gs://...)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path} not found: {workdir!r} has no training metrics.') from None
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def metric_series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps int [T], values float [T]) of one metric, sorted by step.

  A step logged twice (a run resumed from an older checkpoint) keeps its last value; a value
  stored as null (a non-finite one, in strict JSON) is left out.
  """
  by_step = {int(r['step']): float(r[key]) for r in rows if r.get(key) is not None}
  if not by_step:
    raise KeyError(f'metric {key!r} is in none of the {len(rows)} rows.')
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps], np.float64)


def regularisation_table(
  workdirs: Sequence[str], keys: Sequence[str] = ('A_norm', 'A_bias_norm'), last: int = 1
) -> dict[str, Any]:
  """One row per run, sorted by sigma: its StoP setting and the final values of `keys`.

  Args:
    workdirs: run directories (config.json and metrics.jsonl).
    keys: metrics to read.
    last: average of the last `last` logged values (smooths a noisy end of training).
  Returns:
    {'workdir': [R] str, 'mode': [R] str, 'sigma': float [R], 'step': int [R] (last step read),
     and each key: float [R]}.
  """
  if not workdirs:
    raise ValueError('no run directory given.')
  if last < 1:
    raise ValueError(f'last={last}: expected >= 1.')
  rows = []
  for workdir in workdirs:
    config = config_lib.load_json(workdir)
    metrics = read_metrics(workdir)
    row = {'workdir': workdir, 'mode': config.stop.mode, 'sigma': float(config.stop.sigma)}
    for key in keys:
      steps, values = metric_series(metrics, key)
      row[key] = float(values[-last:].mean())
      row['step'] = int(steps[-1])
    rows.append(row)
  rows.sort(key=lambda r: (r['sigma'], r['mode']))
  table = {k: [r[k] for r in rows] for k in ('workdir', 'mode')}
  table['sigma'] = np.array([r['sigma'] for r in rows])
  table['step'] = np.array([r['step'] for r in rows], np.int64)
  for key in keys:
    table[key] = np.array([r[key] for r in rows])
  return table


def plot_regularisation(table: Mapping[str, Any], keys: Sequence[str] = ('A_norm', 'A_bias_norm')):
  """Each metric against sigma (paper Fig. 4), one line per StoP mode.

  Returns:
    The matplotlib Figure (len(keys) axes).
  """
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  modes = list(dict.fromkeys(table['mode']))
  for ax, key in zip(axes[0], keys, strict=True):
    for mode in modes:
      sel = np.array([m == mode for m in table['mode']])
      ax.plot(table['sigma'][sel], np.asarray(table[key])[sel], 'o-', label=f'stop.mode={mode}')
    ax.set_xlabel(r'$\sigma$')
    ax.set_ylabel(METRIC_LABELS.get(key, key))
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_metric_curves(workdirs: Sequence[str], keys: Sequence[str] = ('A_norm', 'A_bias_norm')):
  """Training curves of `keys`, one line per run labelled by its sigma.

  Returns:
    The matplotlib Figure (len(keys) axes).
  """
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for workdir in workdirs:
    config = config_lib.load_json(workdir)
    rows = read_metrics(workdir)
    label = rf'$\sigma$={config.stop.sigma:g} ({config.stop.mode})'
    for ax, key in zip(axes[0], keys, strict=True):
      ax.plot(*metric_series(rows, key), label=label)
  for ax, key in zip(axes[0], keys, strict=True):
    ax.set_xlabel('step')
    ax.set_ylabel(METRIC_LABELS.get(key, key))
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  return fig
