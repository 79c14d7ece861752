"""The run directory's own files: config.json and plan.json, the resume check, summary.json,
and the start-up check that every process sees the same workdir.

Every file goes through `runtime/fileio.py`, so WORKDIR may be a local or shared path or an
object store (gs://...). (Checkpoints, metrics.jsonl and TensorBoard events are written by
runtime/checkpointing.py and runtime/metric_logging.py.)
"""

from __future__ import annotations

import json
import os
import secrets

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from stop_jax import config as config_lib
from stop_jax.runtime import checkpointing, cli, fileio, metric_logging
from stop_jax.train.plan import RunPlan

# Written by process 0 and read by every process at start-up, then removed.
SHARED_CHECK_FILE = '.stop_jax_shared_check'


class WorkdirError(cli.UserError, RuntimeError):
  """A workdir that cannot be used: not writable, or not the same directory on every process."""


# Keys that may change when a run is resumed: they steer the job, not the result.
RESUMABLE_CHANGES = (
  'total_steps',
  'log_every_steps',
  'checkpoint.',
  'eval.',
  'finetune.',  # read by stop_jax.finetune only, never by pretraining
  'mesh.',
  'data.data_dir',
  'model.remat',
  'xla_cpu_matmul',
  'on_nonfinite',
  'max_consecutive_skips',
  'divergence.',
)


def save_config(config: ml_collections.ConfigDict, plan: RunPlan, workdir: str):
  """The resolved config and plan next to the run, for humans and for resuming.

  Each file is replaced atomically: a reader sees the previous version or this one.
  """
  fileio.makedirs(workdir)
  fileio.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  fileio.write_json(os.path.join(workdir, 'plan.json'), plan.to_json_dict(), indent=2)


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
  if not fileio.exists(path):
    return
  old = fileio.read_json(path)
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
  """summary.json: what `train_and_evaluate` returned (numbers as plain floats), strict JSON:
  a non-finite value is the string "NaN", "Infinity" or "-Infinity" (as in metrics.jsonl)."""
  text = json.dumps(summary, indent=2, default=float)  # numpy / jax scalars become floats
  text = json.dumps(metric_logging.json_safe(json.loads(text)), indent=2, allow_nan=False)
  fileio.write_text(os.path.join(workdir, 'summary.json'), text)


def summary_path(workdir: str) -> str:
  return os.path.join(workdir, 'summary.json')


def finished_summary(config: ml_collections.ConfigDict, workdir: str, final_names) -> dict | None:
  """summary.json of a run that has nothing left to do, else None; the same on every process.

  Finished: summary.json holds final metrics for total_steps (not a preempted run), the latest
  checkpoint is at that step with the files summary.json recorded (`final_checkpoint`: names
  and sizes, so a damaged final checkpoint is resumed from, i.e. repaired), and it has a result for each end-of-run evaluator the config asks
  for (`final_names`), unless `eval.rerun_final` asks to run them again. total_steps is the
  config's, or, for an epoch-based run (total_steps <= 0), plan.json's when the saved config
  was epoch-based too (the config check has made sure the rest is unchanged). Reads only small
  files and the checkpoint listing: nothing is compiled, probed or counted.
  """
  found = None
  if jax.process_index() == 0:
    found = _finished_summary(config, workdir, final_names)
  if jax.process_count() > 1:
    flag = multihost_utils.broadcast_one_to_all(np.int32(found is not None))
    if int(flag) and found is None:
      found = fileio.read_json(summary_path(workdir))
    elif not int(flag):
      found = None
  return found


def _finished_summary(config, workdir: str, final_names) -> dict | None:
  if config.eval.rerun_final or not fileio.exists(summary_path(workdir)):
    return None
  try:
    summary = fileio.read_json(summary_path(workdir))
  except ValueError:  # a summary.json that does not parse: not a finished run
    return None
  steps = summary.get('steps')
  if summary.get('preempted') or not summary.get('final_metrics') or not isinstance(steps, int):
    return None
  total = config.total_steps
  if total <= 0:
    saved, plan = (os.path.join(workdir, name) for name in ('config.json', 'plan.json'))
    if not (fileio.exists(saved) and fileio.exists(plan)):
      return None
    if fileio.read_json(saved).get('total_steps', 1) > 0:
      return None
    total = fileio.read_json(plan).get('total_steps')
  if steps != total or any(name not in summary for name in final_names):
    return None
  committed = checkpointing.committed_steps(workdir)
  if not committed or committed[-1] != total:
    return None
  # The final checkpoint must still be the one the summary was written for: a damaged one
  # (say, a truncated file) sends the rerun down the resume path, which falls back and repairs.
  # (Summaries written before fingerprints existed are taken as they are.)
  recorded = summary.get('final_checkpoint')
  if recorded is not None and recorded != checkpointing.step_fingerprint(workdir, total):
    return None
  return summary


def barrier(name: str):
  """Waits until every process gets here (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check(config: ml_collections.ConfigDict, workdir: str):
  """Start-up of a run directory, on every process, before anything is written into it.

  The workdir is checked to be shared and every process compares the config with the
  workdir's config.json (all raise the same ConfigError, or none does); a barrier follows, so
  `save` (process 0 replacing config.json) never runs while another process reads it.
  """
  check_shared(workdir)
  check_workdir_config(config, workdir)
  barrier('stop_jax: config.json read')


def save(config: ml_collections.ConfigDict, plan: RunPlan, workdir: str):
  """After `check`: process 0 replaces config.json and plan.json; every process waits for it."""
  if jax.process_index() == 0:
    save_config(config, plan, workdir)
  barrier('stop_jax: config.json written')


def prepare(config: ml_collections.ConfigDict, plan: RunPlan, workdir: str):
  """`check`, then `save`."""
  check(config, workdir)
  save(config, plan, workdir)


def _token() -> str:
  """A random token chosen by process 0, the same on every process."""
  token = np.frombuffer(secrets.token_bytes(16), np.uint8)
  if jax.process_count() > 1:
    token = multihost_utils.broadcast_one_to_all(token)
  return bytes(np.asarray(token, np.uint8)).hex()


def check_shared(workdir: str):
  """Process 0 writes a fresh token into the workdir; every process must read it back.

  Catches, before anything is compiled, workdirs that are each host's own local disk (they
  would split the checkpoints between hosts) and workdirs that cannot be written at all.
  Every process gets the same verdict (an all-gather), so none is left waiting at a barrier.

  Raises:
    WorkdirError: one line naming the workdir, the processes that failed, and what to use.
  """
  token, index = _token(), jax.process_index()
  path = os.path.join(workdir, SHARED_CHECK_FILE)
  status, detail = 0, ''  # 0 ok, 1 process 0 could not write, 2 this process cannot read it
  if index == 0:
    try:
      fileio.makedirs(workdir)
      fileio.write_text(path, token)
    except Exception as e:  # noqa: BLE001 (reported to every process below)
      status, detail = 1, f'{type(e).__name__}: {e}'
  barrier('stop_jax: workdir check written')
  if status == 0:
    try:
      seen = fileio.read_text(path)
    except Exception as e:  # noqa: BLE001
      seen, detail = None, f'{type(e).__name__}: {e}'
    status = 0 if seen == token else 2
  statuses = [status]
  if jax.process_count() > 1:
    statuses = np.asarray(multihost_utils.process_allgather(np.int32(status))).reshape(-1)
  if index == 0 and statuses[0] != 1:
    fileio.remove(path, missing_ok=True)
  if statuses[0] == 1:
    raise WorkdirError(
      f'workdir {workdir} cannot be written by process 0 ({detail or "see process 0"}); check '
      'the path and, for gs://, the credentials (README: "Workdirs on GCS").'
    )
  blind = [i for i, s in enumerate(statuses) if s]
  if blind:
    who = f'process {blind[0]}' if len(blind) == 1 else f'processes {blind}'
    raise WorkdirError(
      f'workdir {workdir} is not shared between processes: {who} cannot see {path} written by'
      f' process 0{f" ({detail})" if index in blind and detail else ""}; use a gs:// path or a'
      ' shared filesystem mounted at the same path on every host.'
    )
