"""The run directory's own files: config.json and plan.json, the resume check, summary.json.

(Checkpoints, metrics.jsonl and TensorBoard events are written by runtime/checkpointing.py and
runtime/metric_logging.py.)
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from stop_jax import config as config_lib
from stop_jax.train.plan import RunPlan

# Keys that may change when a run is resumed: they steer the job, not the result.
RESUMABLE_CHANGES = (
  'total_steps',
  'log_every_steps',
  'checkpoint.',
  'eval.',
  'mesh.',
  'data.data_dir',
  'model.remat',
  'xla_cpu_matmul',
  'on_nonfinite',
  'max_consecutive_skips',
)


def save_config(config: ml_collections.ConfigDict, plan: RunPlan, workdir: str):
  """The resolved config and plan next to the run, for humans and for resuming."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, 'plan.json'), 'w') as f:
    json.dump(plan.to_json_dict(), f, indent=2)


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(old: dict, new: dict) -> list[str]:
  """Keys whose values differ between two config dicts (as JSON), minus RESUMABLE_CHANGES."""
  a, b = _flatten(old), _flatten(new)
  norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (JSON has no tuples)
  return [
    f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
    for k in sorted(a.keys() | b.keys())
    if norm(a.get(k)) != norm(b.get(k)) and not k.startswith(RESUMABLE_CHANGES)
  ]


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str):
  """Refuses to resume a workdir that holds another config, unless explicitly allowed."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  changes = config_changes(old, json.loads(config.to_json_best_effort()))
  if not changes:
    return
  listing = '\n  '.join(changes)
  if config.checkpoint.allow_config_change:
    logging.warning('resuming %s with a changed config:\n  %s', workdir, listing)
    return
  raise config_lib.ConfigError(
    f'{workdir} holds a run with another config:\n  {listing}\n'
    'Use a new --workdir, or pass --config.checkpoint.allow_config_change=True to resume anyway.'
  )


def write_summary(workdir: str, summary: dict):
  """summary.json: what `train_and_evaluate` returned (numbers as plain floats)."""
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2, default=float)
