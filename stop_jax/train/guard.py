"""The non-finite guard: stops the run, or skips a step, when the loss or gradients are not finite.

The step itself never applies a non-finite update (`step.make_train_step` keeps the old state
and sets metrics['nonfinite']); the guard is the host's side: it reads that flag one step late,
so that checking never waits for the step in flight, and always before a checkpoint is saved,
so that no checkpoint is written past an unnoticed non-finite step.
"""

from __future__ import annotations

from absl import logging


class NonFiniteError(FloatingPointError):
  """The loss or the gradients were not finite; the message names the step and checkpoint."""


class NonFiniteGuard:
  """Counts non-finite steps and decides: go on (on_nonfinite='skip') or raise NonFiniteError.

  Attributes:
    skipped: non-finite steps seen in the whole run (restored from the checkpoint on resume).
  """

  def __init__(self, on_nonfinite: str, max_consecutive_skips: int, ckpt, skipped: int = 0):
    """on_nonfinite: 'stop' or 'skip' (config.on_nonfinite); ckpt: the run's Checkpointer (its
    last saved step goes in the error message, and its pending saves finish before raising)."""
    self.on_nonfinite = on_nonfinite
    self.max_consecutive_skips = max_consecutive_skips
    self.skipped = skipped
    self._ckpt = ckpt
    self._consecutive = 0
    self._pending = None  # (step, metrics) whose finiteness is checked one step late

  def push(self, step: int, metrics: dict):
    """Checks the step pushed before (waiting only for it) and keeps this one for later."""
    self.flush()
    self._pending = (step, metrics)

  def flush(self):
    """Checks the step still pending, if any: before a save and at the end of the run."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self.check(*pending)

  def check(self, step: int, metrics: dict):
    """Raises NonFiniteError, or logs and counts a skipped step, if metrics['nonfinite']."""
    if not int(metrics['nonfinite']):
      self._consecutive = 0
      return
    self.skipped += 1
    self._consecutive += 1
    last = self._ckpt.last_saved_step
    if last:
      where = f'the last good checkpoint is step {last} in {self._ckpt.directory}'
    else:
      where = 'no checkpoint was saved yet'
    stop = self.on_nonfinite == 'stop'
    if stop or self._consecutive >= self.max_consecutive_skips:
      self._ckpt.wait()
      reason = (
        'config.on_nonfinite=stop'
        if stop
        else f'{self._consecutive} consecutive skipped steps (config.max_consecutive_skips)'
      )
      raise NonFiniteError(
        f'non-finite loss or gradients at step {step} (loss {float(metrics["loss"])}, grad norm '
        f'{float(metrics["grad_norm"])}); stopped by {reason}. The update was not applied; '
        f'{where}.'
      )
    logging.warning(
      'non-finite loss or gradients at step %d: update skipped (%d so far)', step, self.skipped
    )
