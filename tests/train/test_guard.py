"""The non-finite guard on its own: a fake checkpointer and hand-made step metrics."""

import logging

import numpy as np
import pytest

from stop_jax.train.guard import NonFiniteError, NonFiniteGuard


class FakeCheckpointer:
  def __init__(self, last_saved_step=None):
    self.last_saved_step = last_saved_step
    self.directory = '/runs/x/checkpoints'
    self.waits = 0

  def wait(self):
    self.waits += 1


def _metrics(finite: bool) -> dict:
  loss = 0.5 if finite else np.nan
  return {'nonfinite': np.int32(not finite), 'loss': np.float32(loss), 'grad_norm': 1.0}


def test_stop_mode_raises_naming_the_step_and_the_last_checkpoint():
  ckpt = FakeCheckpointer(last_saved_step=3)
  guard = NonFiniteGuard('stop', 5, ckpt)
  guard.check(4, _metrics(True))
  with pytest.raises(NonFiniteError) as info:
    guard.check(5, _metrics(False))
  message = str(info.value)
  assert message.startswith('non-finite loss or gradients at step 5 (loss nan, grad norm 1.0)')
  assert 'stopped by config.on_nonfinite=stop. The update was not applied;' in message
  assert message.endswith('the last good checkpoint is step 3 in /runs/x/checkpoints.')
  assert ckpt.waits == 1  # pending saves finish before the run stops


def test_without_a_checkpoint_the_message_says_so():
  guard = NonFiniteGuard('stop', 5, FakeCheckpointer())
  with pytest.raises(NonFiniteError, match=r'no checkpoint was saved yet\.$'):
    guard.check(1, _metrics(False))


def test_skip_mode_counts_and_stops_after_max_consecutive_skips(caplog):
  guard = NonFiniteGuard('skip', 2, FakeCheckpointer(2), skipped=3)  # 3 from before a resume
  with caplog.at_level(logging.WARNING):
    guard.check(3, _metrics(False))
  assert guard.skipped == 4
  assert 'non-finite loss or gradients at step 3: update skipped (4 so far)' in caplog.text
  guard.check(4, _metrics(True))  # a finite step resets the consecutive count
  guard.check(5, _metrics(False))
  with pytest.raises(NonFiniteError, match='2 consecutive skipped steps') as info:
    guard.check(6, _metrics(False))
  assert 'at step 6' in str(info.value) and '(config.max_consecutive_skips)' in str(info.value)
  assert guard.skipped == 6


def test_push_checks_one_step_late_and_flush_checks_the_rest():
  guard = NonFiniteGuard('stop', 1, FakeCheckpointer())
  guard.push(1, _metrics(False))  # not read yet: the step may still be running
  with pytest.raises(NonFiniteError, match='at step 1 '):
    guard.push(2, _metrics(True))
  guard = NonFiniteGuard('stop', 1, FakeCheckpointer())
  guard.push(1, _metrics(True))
  guard.push(2, _metrics(False))
  with pytest.raises(NonFiniteError, match='at step 2 '):
    guard.flush()
  guard.flush()  # nothing pending any more
