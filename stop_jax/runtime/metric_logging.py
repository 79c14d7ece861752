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
"""

from __future__ import annotations

import json
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


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


class MetricLogger:
  """Writes metrics of selected steps; only process 0 writes files."""

  def __init__(self, workdir: str, total_steps: int, global_batch: int, write: bool = True):
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
    if write:
      fileio.makedirs(workdir)
      self._jsonl = fileio.Appender(os.path.join(workdir, 'metrics.jsonl'))
      self._tb = self._open_tensorboard()

  def _open_tensorboard(self):
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard is optional; the JSON file always exists.
      logging.warning('tensorboardX not installed: no TensorBoard events.')
      return None
    if not self._remote:
      return SummaryWriter(self._tb_dir)
    # tensorboardX's own gs:// writer needs google-cloud-storage's client and uploads on every
    # flush; writing locally and uploading in `sync()` works for every store fileio reaches.
    self._tb_local = tempfile.mkdtemp(prefix='stop_jax_tb_')
    # Event files are named by the second and the host: a suffix keeps two runs apart.
    return SummaryWriter(self._tb_local, filename_suffix=f'.{uuid.uuid4().hex[:8]}')

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
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f'train/{k}', v, step)
      self._tb.flush()
    self._sync_if_due()

  def write_summary(self, step: int, values: dict, prefix: str):
    """Writes evaluation results (e.g. probe accuracies) to the same sinks."""
    if not self.write:
      return
    self._jsonl.write(
      json.dumps({'step': step, **{f'{prefix}/{k}': v for k, v in values.items()}}) + '\n'
    )
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, int | float):
          self._tb.add_scalar(f'{prefix}/{k}', v, step)
      self._tb.flush()
    self._sync_if_due()

  def sync(self):
    """Makes every line so far durable in the workdir, the pending step's included.

    A no-op locally (lines are written as they come). On an object store it fetches the
    pending metrics and uploads metrics.jsonl and the TensorBoard events.
    """
    if not self._remote:
      return
    self.flush_pending()
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
