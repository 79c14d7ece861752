"""Training metrics to the terminal, TensorBoard and a JSON-lines file, without stalling.

The trainer hands over the *device* metrics of a logging step and the logger only fetches them
after the next step has been dispatched (`flush_pending`), so the host never waits for the
accelerator to drain just to print a line.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

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
    if write:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # noqa: SIM115
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:  # TensorBoard is optional; the JSON file always exists.
        logging.warning('tensorboardX not installed: no TensorBoard events.')

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
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f'train/{k}', v, step)
      self._tb.flush()

  def write_summary(self, step: int, values: dict, prefix: str):
    """Writes evaluation results (e.g. probe accuracies) to the same sinks."""
    if not self.write:
      return
    self._jsonl.write(json.dumps({'step': step, **{f'{prefix}/{k}': v for k, v in values.items()}}))
    self._jsonl.write('\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, int | float):
          self._tb.add_scalar(f'{prefix}/{k}', v, step)
      self._tb.flush()

  def close(self):
    self.flush_pending()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
