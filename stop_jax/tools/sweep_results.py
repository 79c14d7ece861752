"""A sweep's results: every finished run's probe figures, mean +- std per variant, a table, a plot.

Read from each run directory (local or gs://): `summary.json` (the training probe, key
`probe/<encoder>/accuracy`) and every `eval/<name>.json` written by `python -m stop_jax.evaluate`
(key `<name>/<feature type>/<metric>` for each numeric leaf). Pure aggregation in `summarise`;
the files are written by `aggregate`.
"""

from __future__ import annotations

import io
import math
import os
import statistics

from stop_jax.runtime import fileio


def run_metrics(run_dir: str) -> dict[str, float]:
  """The numeric results of one finished run, flattened to 'a/b/c' keys ({} if unfinished)."""
  out: dict[str, float] = {}
  summary_path = os.path.join(run_dir, 'summary.json')
  if not fileio.exists(summary_path):
    return out
  summary = fileio.read_json(summary_path)
  if not summary.get('final_metrics'):
    return out
  for encoder, result in (summary.get('probe') or {}).items():
    if isinstance(result, dict) and isinstance(result.get('accuracy'), int | float):
      out[f'probe/{encoder}/accuracy'] = float(result['accuracy'])
  eval_dir = os.path.join(run_dir, 'eval')
  for path in fileio.glob(os.path.join(eval_dir, '*.json')):
    name = os.path.basename(path)[: -len('.json')]
    record = fileio.read_json(path)
    # An evaluation record (stop_jax.evaluate): its scores per feature type, not its metadata.
    _flatten(record.get('results', record), name, out)
  return out


# The scores results.md shows (results.json keeps every number): the last key of a metric.
HEADLINE = ('accuracy', 'top1', 'J&F-Mean')


def headline(metric: str) -> bool:
  return metric.rsplit('/', 1)[-1] in HEADLINE


def headline_metrics(summary: dict) -> list[str]:
  """The headline metrics any variant has, sorted; 'top1' only where no 'accuracy' says the
  same (a logistic-regression record carries both)."""
  found = {m for v in summary.values() for m in v if headline(m)}
  return sorted(
    m for m in found if not (m.endswith('/top1') and m[: -len('top1')] + 'accuracy' in found)
  )


def _flatten(value, prefix: str, out: dict):
  if isinstance(value, dict):
    for k, v in value.items():
      _flatten(v, f'{prefix}/{k}', out)
  elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
    out[prefix] = float(value)


def summarise(per_run: list[dict]) -> dict:
  """{variant: {metric: {'mean', 'std', 'n', 'values'}}} over seeds; std 0 for one seed.

  per_run: [{'variant', 'seed', 'metrics': {metric: value}}] (unfinished runs have no metrics).
  """
  table: dict[str, dict[str, list[float]]] = {}
  for r in per_run:
    for metric, value in r['metrics'].items():
      table.setdefault(r['variant'], {}).setdefault(metric, []).append(value)
  return {
    variant: {
      m: {
        'mean': statistics.fmean(v),
        'std': statistics.stdev(v) if len(v) > 1 else 0.0,
        'n': len(v),
        'values': v,
      }
      for m, v in sorted(metrics.items())
    }
    for variant, metrics in table.items()
  }


def _scale(metric: str) -> float:
  """Accuracies are shown in %."""
  return 100.0 if metric.rsplit('/', 1)[-1] in ('accuracy', 'top1', 'top5') else 1.0


def markdown(summary: dict, variants: list[str], missing: list[str]) -> str:
  """One row per variant, one column per metric: 'mean +- std (n)'; accuracies in %."""
  metrics = headline_metrics(summary)
  lines = ['| variant | ' + ' | '.join(metrics) + ' |', '|---' * (len(metrics) + 1) + '|']
  for variant in variants:
    cells = []
    for m in metrics:
      s = summary.get(variant, {}).get(m)
      scale = _scale(m)
      cells.append(
        '-' if s is None else f'{s["mean"] * scale:.2f} +- {s["std"] * scale:.2f} ({s["n"]})'
      )
    lines.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
  if missing:
    lines.append('')
    lines.append('Not finished (no results yet): ' + ', '.join(missing))
  return '\n'.join(lines) + '\n'


def bar_plot(summary: dict, variants: list[str], metrics: list[str]) -> bytes | None:
  """PNG bytes: one panel per metric, mean +- std per variant (None if no variant has any)."""
  metrics = [m for m in metrics if any(m in summary.get(v, {}) for v in variants)]
  if not metrics:
    return None
  import matplotlib  # noqa: PLC0415 (plotting only when there is something to plot)

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  width = max(4.0, 0.9 * len(variants) + 1.5)
  fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 3.8), squeeze=False)
  for ax, metric in zip(axes[0], metrics, strict=True):
    present = [v for v in variants if metric in summary.get(v, {})]
    scale = _scale(metric)
    means = [summary[v][metric]['mean'] * scale for v in present]
    stds = [summary[v][metric]['std'] * scale for v in present]
    ax.bar(range(len(present)), means, yerr=stds, capsize=4, color='tab:blue')
    ax.set_xticks(range(len(present)), present, rotation=30, ha='right')
    ax.set_ylabel(metric + (' (%)' if scale == 100.0 else ''), fontsize=8)
    lo = min(m - s for m, s in zip(means, stds, strict=True))
    hi = max(m + s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  plt.close(fig)
  return buf.getvalue()


def aggregate(runs: list[dict], workdir: str) -> dict:
  """Writes results.json, results.md and results.png into the sweep directory; returns them."""
  per_run = [{**r, 'metrics': run_metrics(r['workdir'])} for r in runs]
  variants = list(dict.fromkeys(r['variant'] for r in runs))
  summary = summarise(per_run)
  missing = [f'{r["variant"]}/seed{r["seed"]}' for r in per_run if not r['metrics']]
  result = {
    'summary': summary,
    'runs': [{k: r[k] for k in ('variant', 'seed', 'workdir', 'metrics')} for r in per_run],
    'missing': missing,
  }
  fileio.write_json(os.path.join(workdir, 'results.json'), result, indent=2)
  fileio.write_text(os.path.join(workdir, 'results.md'), markdown(summary, variants, missing))
  # The training probe and each evaluation's score on the last layer's features.
  shown = headline_metrics(summary)
  plotted = [m for m in shown if m.startswith('probe/pretrained/') or '/last/' in m]
  png = bar_plot(summary, variants, plotted[:6])
  if png is not None:
    fileio.write_bytes(os.path.join(workdir, 'results.png'), png)
  return result
