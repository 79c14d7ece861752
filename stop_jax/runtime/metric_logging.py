"""Training metrics to the terminal, TensorBoard and a JSON-lines file, without stalling.

The trainer hands over the *device* metrics of a logging step and the logger only fetches them
after the next step has been dispatched (`flush_pending`), so the host never waits for the
accelerator to drain just to print a line.

The workdir may be local or an object store (`fileio`). Locally every line is appended and
flushed as it comes, and TensorBoard writes into WORKDIR/tb. Object stores cannot append:
metrics.jsonl is rewritten whole (one upload) by `sync()`, and TensorBoard writes its events into
a local temporary directory whose files `sync()` uploads to WORKDIR/tb. The trainer calls
`sync()` before every checkpoint save, so the file holds every step up to the checkpoint a
resume starts from; between saves it is synced at most every `REMOTE_SYNC_EVERY_S` seconds,
and at `close()`.

Every line of metrics.jsonl is strict JSON: a non-finite value is written as the string "NaN",
"Infinity" or "-Infinity" (as protobuf's JSON mapping does; `float()` reads them back), never
as a bare NaN. TensorBoard gets finite values only (one warning per metric name otherwise).
A resumed run opens the file with `start_step`: rows past that step (logged after the checkpoint
it resumes from) are dropped, so a recomputed step is never logged twice.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid

import jax
import numpy as np
from absl import logging

from stop_jax.runtime import fileio

# Object-store workdirs: the most often metrics.jsonl and the events are uploaded between saves.
REMOTE_SYNC_EVERY_S = 60.0

# Order and format of the one-line summary; everything else still goes to TB and JSON.
_LINE = (
  ('loss', '{:.4f}'),
  ('lr', '{:.2e}'),
  ('wd', '{:.3f}'),
  ('momentum', '{:.5f}'),
  ('grad_norm', '{:.3f}'),
  ('A_norm', '{:.2f}'),
  ('A_bias_norm', '{:.3f}'),
  ('noise_to_pos', '{:.3f}'),
  ('ctx_tokens', '{:.1f}'),
  ('tgt_tokens', '{:.1f}'),
)


def json_safe(value):
  """`value` with every non-finite float replaced by "NaN", "Infinity" or "-Infinity".

  Dicts, lists and tuples are walked; numpy floats become floats; anything else is returned
  unchanged. `json.dumps(json_safe(x), allow_nan=False)` then never fails on a float.
  """
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [json_safe(v) for v in value]
  if isinstance(value, float | np.floating):
    value = float(value)
    if math.isnan(value):
      return 'NaN'
    if math.isinf(value):
      return 'Infinity' if value > 0 else '-Infinity'
  return value


def from_json_safe(value):
  """A metrics.jsonl value back as a number: the strings of `json_safe` become floats."""
  if value in ('NaN', 'Infinity', '-Infinity'):
    return float(value)
  return value


def _reject_constant(name: str):
  raise ValueError(f'non-standard JSON constant {name}')


def _parse_row(line: str) -> tuple[dict | None, bool]:
  """(row, strict): the parsed line (None if it is not a JSON object) and whether it was strict
  JSON (older files hold bare NaN / Infinity)."""
  try:
    return json.loads(line, parse_constant=_reject_constant), True
  except ValueError:
    pass
  try:
    row = json.loads(line)
  except ValueError:
    return None, False
  return (row if isinstance(row, dict) else None), False


def truncate_rows(path: str, start_step: int, rerun_prefixes: tuple[str, ...] = ()) -> dict:
  """Rewrites metrics.jsonl with only the rows a run resuming at `start_step` keeps.

  Dropped: rows with step > start_step (logged after the checkpoint being resumed, about to be
  logged again), rows at start_step whose keys all start with one of `rerun_prefixes`
  (evaluators about to run again at that step), and lines that do not parse (a line cut by a
  crash). Rows kept with bare NaN / Infinity (older files) are rewritten as strict JSON. The
  file is rewritten (atomically, one upload on object stores) only when something changed.

  Returns:
    The last training row (one with a 'loss') at start_step without its 'step', values as
    floats, or {} when there is none: the final metrics of a run that has nothing left to do.
  """
  try:
    text = fileio.read_text(path)
  except FileNotFoundError:
    return {}
  kept, dropped, rewritten, last = [], 0, 0, {}
  for line in text.splitlines():
    if not line.strip():
      continue
    row, strict = _parse_row(line)
    step = row.get('step') if row else None
    if not isinstance(step, int) or step > start_step:
      dropped += 1
      continue
    keys = [k for k in row if k != 'step']
    if step == start_step and keys and all(k.startswith(rerun_prefixes) for k in keys):
      dropped += 1
      continue
    if step == start_step and 'loss' in row:
      last = {k: from_json_safe(v) for k, v in row.items() if k != 'step'}
    if not strict:
      line, rewritten = json.dumps(json_safe(row), allow_nan=False), rewritten + 1
    kept.append(line)
  if dropped or rewritten or (kept and not text.endswith('\n')):
    fileio.write_text(path, ''.join(line + '\n' for line in kept))
  if dropped:
    logging.info(
      'metrics.jsonl: dropped %d rows past step %d (resuming there; logged again)',
      dropped,
      start_step,
    )
  return last


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


class MetricLogger:
  """Writes metrics of selected steps; only process 0 writes files."""

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    global_batch: int,
    write: bool = True,
    start_step: int | None = None,
    rerun_prefixes: tuple[str, ...] = (),
  ):
    """start_step: the step the run starts (or resumes) at; when given, metrics.jsonl is first
    cut back to it (`truncate_rows`, with `rerun_prefixes`) and TensorBoard hides the events
    logged after it (tensorboardX's purge_step). `resumed_metrics` is then the training row
    logged at start_step ({} if none): the final metrics when nothing is left to run."""
    self.total_steps = total_steps
    self.global_batch = global_batch
    self.write = write
    self._pending = None
    self._last = None  # (step, time) of the last written line, for images/s.
    self._tb = None
    self._jsonl = None
    self._remote = write and fileio.is_remote(workdir)
    self._tb_dir = os.path.join(workdir, 'tb')
    self._tb_local = None  # object stores: the local directory TensorBoard writes into
    self._tb_uploaded: dict[str, int] = {}  # event file -> size last uploaded
    self._last_sync = time.monotonic()
    self._tb_skipped: set[str] = set()  # metric names already warned about (non-finite)
    self.resumed_metrics: dict = {}
    self.last_metrics: dict | None = None  # the latest values flush_pending fetched
    if write:
      fileio.makedirs(workdir)
      path = os.path.join(workdir, 'metrics.jsonl')
      if start_step is not None:
        self.resumed_metrics = truncate_rows(path, start_step, rerun_prefixes)
      self._jsonl = fileio.Appender(path)
      self._tb = self._open_tensorboard(start_step)

  def _open_tensorboard(self, start_step: int | None):
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard is optional; the JSON file always exists.
      logging.warning('tensorboardX not installed: no TensorBoard events.')
      return None
    # TensorBoard hides events of earlier files at steps >= purge_step: the steps a resumed run
    # logs again are shown once.
    purge = None if not start_step else start_step + 1
    if not self._remote:
      return SummaryWriter(self._tb_dir, purge_step=purge)
    # tensorboardX's own gs:// writer needs google-cloud-storage's client and uploads on every
    # flush; writing locally and uploading in `sync()` works for every store fileio reaches.
    self._tb_local = tempfile.mkdtemp(prefix='stop_jax_tb_')
    # Event files are named by the second and the host: a suffix keeps two runs apart.
    return SummaryWriter(
      self._tb_local, filename_suffix=f'.{uuid.uuid4().hex[:8]}', purge_step=purge
    )

  def start(self, step: int):
    """Marks the time origin for throughput (call after the first, compiling step)."""
    self._last = (step, time.perf_counter())

  def push(self, step: int, device_metrics: dict):
    """Keeps the metrics of `step` (1-based count of finished steps) to write later."""
    self.flush_pending()
    self._pending = (step, device_metrics)

  def flush_pending(self) -> dict | None:
    """Fetches and writes the pending metrics, if any; returns them as floats."""
    if self._pending is None:
      return None
    step, device_metrics = self._pending
    self._pending = None
    values = {k: float(np.asarray(v)) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    if self._last is not None and step > self._last[0]:
      rate = (step - self._last[0]) / (now - self._last[1])
      values['steps_per_s'] = rate
      values['images_per_s'] = rate * self.global_batch
      values['eta_s'] = (self.total_steps - step) / rate
    self._last = (step, now)
    self.last_metrics = values
    if self.write:
      self._emit(step, values)
    return values

  def _emit(self, step: int, values: dict):
    parts = [f'step {step}/{self.total_steps}']
    parts += [f'{k} {fmt.format(values[k])}' for k, fmt in _LINE if k in values]
    if 'images_per_s' in values:
      parts.append(f'{values["images_per_s"]:.1f} img/s')
      parts.append(f'eta {_fmt_eta(values["eta_s"])}')
    logging.info(' | '.join(parts))
    self._write_row(step, {f'train/{k}': v for k, v in values.items()}, values)

  def write_summary(self, step: int, values: dict, prefix: str):
    """Writes evaluation results (e.g. probe accuracies) to the same sinks."""
    if not self.write:
      return
    row = {f'{prefix}/{k}': v for k, v in values.items()}
    self._write_row(step, row, row)

  def _write_row(self, step: int, scalars: dict, row: dict):
    """One strict-JSON line {'step', **row}; the finite numbers of `scalars` to TensorBoard."""
    self._jsonl.write(json.dumps(json_safe({'step': step, **row}), allow_nan=False) + '\n')
    if self._tb is not None:
      for tag, v in scalars.items():
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
          continue
        if not math.isfinite(v):
          # tensorboardX would warn on every such write; one line per metric is enough.
          if tag not in self._tb_skipped:
            self._tb_skipped.add(tag)
            logging.warning(
              '%s is %s at step %d: not written to TensorBoard (metrics.jsonl has it as "%s");'
              ' later non-finite values of it are left out silently',
              tag,
              v,
              step,
              json_safe(v),
            )
          continue
        self._tb.add_scalar(tag, v, step)
      self._tb.flush()
    self._sync_if_due()

  def sync(self):
    """Makes every line so far durable in the workdir, the pending step's included.

    Writes the pending step's line (locally every line is then on disk); on an object store
    it also uploads metrics.jsonl and the TensorBoard events. The trainer calls it before every
    checkpoint save, so the file holds every row up to any checkpoint a run resumes from.
    """
    self.flush_pending()
    if self._remote:
      self._upload()

  def _sync_if_due(self):
    if self._remote and time.monotonic() - self._last_sync >= REMOTE_SYNC_EVERY_S:
      self._upload()

  def _upload(self):
    self._jsonl.sync()
    if self._tb_local is not None:
      for name in sorted(os.listdir(self._tb_local)):
        local = os.path.join(self._tb_local, name)
        size = os.path.getsize(local)
        if self._tb_uploaded.get(name) != size:
          with open(local, 'rb') as f:
            fileio.write_bytes(os.path.join(self._tb_dir, name), f.read())
          self._tb_uploaded[name] = size
    self._last_sync = time.monotonic()

  def close(self):
    self.flush_pending()
    if self._tb is not None:
      self._tb.close()
    if self._remote:
      self._upload()
      shutil.rmtree(self._tb_local, ignore_errors=True)
    if self._jsonl is not None:
      self._jsonl.close()
