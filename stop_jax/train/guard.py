"""The step guard: stops the run, or skips a step, when a step is non-finite or diverges.

Two kinds of bad step, both dropped inside the step (`step.apply_update` keeps the old params,
EMA target and optimiser state; the step count still advances):
- non-finite: the loss or the gradients are not finite (metrics['nonfinite']; config.on_nonfinite);
- divergent: finite, but the total loss or the global norm of the optimiser update is above the
  limits this guard passed into the step (metrics['diverged']; config.divergence). A blow-up that
  stays finite for a while (a huge learning rate sends the params to 1e30 before anything is
  NaN) is caught at its first spike instead of many steps later.

The limits (`DivergenceRule.limits`): the update norm above `max_update_ratio` x the params'
norm or above `max_update_norm` (both from the first step on); the total loss above
`loss_spike_factor` x the running median of the losses of the last `window` steps that passed,
or the update norm above `update_spike_factor` x its running median (these two once
`warmup_steps` steps have passed). The limits of step t come from the steps up to t - 2: the
host reads each step's metrics one step late (it never waits for the step in flight), so those
are the steps it has checked when it launches step t, in an uninterrupted run and in a resumed
one alike. The guard's state (those steps, the counts) is in every checkpoint's meta, so a
resumed run decides exactly as an uninterrupted one.

Checking happens one step late and always before a checkpoint is saved. The last good
checkpoint is computed from what the guard verified, not from the save order: a step's state is
trusted when the step passed (or was dropped and left a trusted state unchanged), and a loss
spike at step t also withdraws the trust in the state of step t - 1, the params that produced it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from stop_jax.runtime import fileio
from stop_jax.train import step as step_lib


class NonFiniteError(FloatingPointError):
  """The loss or the gradients were not finite; the message names the step and checkpoint."""


class DivergenceError(FloatingPointError):
  """A step's loss or update norm spiked; the message names the step, the rule and checkpoint."""


def running_median(values: Sequence[float]) -> float:
  """The median of `values` (the mean of the middle two for an even count), in float64."""
  if not len(values):
    raise ValueError('running_median of no values')
  return float(np.median(np.asarray(values, np.float64)))


@dataclasses.dataclass(frozen=True)
class DivergenceRule:
  """config.divergence: when a finite step counts as divergent (0 = that rule off)."""

  loss_spike_factor: float = 0.0
  update_spike_factor: float = 0.0
  max_update_norm: float = 0.0
  max_update_ratio: float = 0.0
  window: int = 100
  warmup_steps: int = 10
  action: str = 'stop'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> DivergenceRule:
    d = config.divergence
    return cls(
      float(d.loss_spike_factor),
      float(d.update_spike_factor),
      float(d.max_update_norm),
      float(d.max_update_ratio),
      int(d.window),
      int(d.warmup_steps),
      d.action,
    )

  def limits(self, losses: Sequence[float], update_norms: Sequence[float], passed: int) -> dict:
    """The step's limits from the steps before it that passed.

    Args:
      losses, update_norms: the total losses and update norms of the last (up to `window`)
        steps that passed, oldest first.
      passed: how many steps passed in the whole run (the warmup counts them).
    Returns:
      {'loss', 'update_norm', 'update_ratio'}: float32 limits (+inf = none), as
      `step.step_limits`.
    """
    loss_limit = update_limit = np.inf
    # Warmup: enough steps in the run and in the window (a run resumed from a checkpoint
    # without the guard's statistics starts its window afresh).
    if passed >= self.warmup_steps and len(losses) >= min(self.warmup_steps, self.window):
      if self.loss_spike_factor > 0:
        loss_limit = self.loss_spike_factor * running_median(losses)
      if self.update_spike_factor > 0:
        update_limit = self.update_spike_factor * running_median(update_norms)
    if self.max_update_norm > 0:
      update_limit = min(update_limit, self.max_update_norm)
    ratio_limit = self.max_update_ratio if self.max_update_ratio > 0 else np.inf
    return step_lib.step_limits(loss_limit, update_limit, ratio_limit)


def _identity(x):
  return x


def replicated(sharding) -> Callable[[dict], dict]:
  """`put` for a compiled step: host limits -> the same global array on every device."""
  from stop_jax.train import setup  # noqa: PLC0415 (the guard's logic needs no devices)

  return lambda host: {k: setup.replicate(np.asarray(v), sharding) for k, v in host.items()}


class StepGuard:
  """Checks each step's verdict, keeps the divergence statistics, and stops or goes on.

  Attributes:
    nonfinite_skipped, divergence_skipped: skipped steps of each kind in the whole run.
    trusted: the newest step whose state the guard vouches for (see the module docstring).
  """

  def __init__(
    self, config: ml_collections.ConfigDict, ckpt, start_step: int = 0, meta=None, put=None
  ):
    """ckpt: the run's Checkpointer (its retained steps and directory go in the stop message,
    its pending saves finish before raising); start_step and meta: the step and the meta of the
    checkpoint the run resumes from (0 and None for a new run); put: host limits -> what the
    compiled step takes (a replicated global array)."""
    self.on_nonfinite = config.on_nonfinite
    self.max_consecutive_skips = config.max_consecutive_skips
    self.rule = DivergenceRule.from_config(config)
    self._ckpt = ckpt
    self._put = put or _identity
    self._device_limits = (None, None)  # (host values, what `put` made of them)
    self._pending = None  # (step, metrics) whose verdict is read one step late
    meta = meta or {}
    saved = meta.get('guard', {})
    self.nonfinite_skipped = int(meta.get('nonfinite_skipped', 0))
    self.divergence_skipped = int(saved.get('divergence_skipped', 0))
    self.trusted = int(saved.get('trusted', start_step))
    self._consecutive = int(saved.get('consecutive', 0))
    self._passed = int(saved.get('passed', start_step))
    # (step, total loss, update norm) of the steps that passed: the window, plus the steps the
    # limits of the next step leave out.
    self._history = collections.deque(
      (tuple(x) for x in saved.get('history', ())), maxlen=self.rule.window + 2
    )

  # --- what the step is given ------------------------------------------------------------------

  def _recent(self, step: int) -> tuple[list, list, int]:
    """(losses, update norms) of the last `window` steps up to step - 2 that passed, and how
    many steps up to step - 2 passed in the whole run."""
    recent = [x for x in self._history if x[0] <= step - 2]
    passed = self._passed - (len(self._history) - len(recent))
    recent = recent[-self.rule.window :]
    return [x[1] for x in recent], [x[2] for x in recent], passed

  def host_limits(self, step: int) -> dict:
    """The limits of `step` (1-based, as logged) from the steps up to step - 2 that passed."""
    return self.rule.limits(*self._recent(step))

  def limits(self, step: int):
    """`host_limits(step)` as the compiled step takes them (made again only when they change)."""
    host = self.host_limits(step)
    key = tuple(float(v) for v in host.values())
    if self._device_limits[0] != key:
      self._device_limits = (key, self._put(host))
    return self._device_limits[1]

  # --- checking ------------------------------------------------------------------------------

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
    """Records a step that passed; counts a bad one and raises NonFiniteError or
    DivergenceError when its action is 'stop' or it makes max_consecutive_skips in a row."""
    nonfinite, diverged = int(metrics['nonfinite']), int(metrics.get('diverged', 0))
    loss = float(metrics.get('total_loss', metrics['loss']))
    update_norm = float(metrics.get('update_norm', 0.0))
    if not nonfinite and not diverged:
      self._consecutive = 0
      self._history.append((step, loss, update_norm))
      self._passed += 1
      self.trusted = step
      return
    self._consecutive += 1
    limits = self.host_limits(step)
    loss_spike = bool(diverged and np.float32(loss) > limits['loss'])
    if loss_spike:  # the params of step - 1 produced this loss: no longer vouched for
      self.trusted = min(self.trusted, step - 2)
    elif self.trusted == step - 1:  # dropped: the state equals the trusted one before it
      self.trusted = step
    if nonfinite:
      self.nonfinite_skipped += 1
      action, key, skipped = self.on_nonfinite, 'on_nonfinite', self.nonfinite_skipped
      what = (
        f'non-finite loss or gradients at step {step} (loss {float(metrics["loss"])}, grad norm '
        f'{float(metrics["grad_norm"])})'
      )
    else:
      self.divergence_skipped += 1
      action, key, skipped = self.rule.action, 'divergence.action', self.divergence_skipped
      what = f'divergence at step {step}: {self._reasons(step, metrics, limits)}'
    if action == 'stop' or self._consecutive >= self.max_consecutive_skips:
      self._stop(what, nonfinite, action == 'stop', key)
    logging.warning('%s: update skipped (%d so far)', what, skipped)

  def _reasons(self, step: int, metrics: dict, limits: dict) -> str:
    """Which limits a divergent step broke, with the figures (as the step compared them)."""
    rule, reasons = self.rule, []
    loss = np.float32(metrics.get('total_loss', metrics['loss']))
    update_norm = np.float32(metrics['update_norm'])
    param_norm = np.float32(metrics['param_norm'])
    losses, norms, _ = self._recent(step)
    median = f'the running median of the last {len(losses)} steps that passed'
    if loss > limits['loss']:
      reasons.append(
        f'loss {loss:.6g} above {rule.loss_spike_factor:g} x {median} '
        f'({running_median(losses):.6g}; config.divergence.loss_spike_factor)'
      )
    if update_norm > limits['update_norm']:
      if rule.max_update_norm > 0 and limits['update_norm'] == np.float32(rule.max_update_norm):
        why = f'config.divergence.max_update_norm={rule.max_update_norm:g}'
      else:
        why = (
          f'{rule.update_spike_factor:g} x {median} ({running_median(norms):.6g}; '
          'config.divergence.update_spike_factor)'
        )
      reasons.append(f'update norm {update_norm:.6g} above {why}')
    if update_norm > limits['update_ratio'] * param_norm:
      reasons.append(
        f"update norm {update_norm:.6g} above {rule.max_update_ratio:g} x the params' norm "
        f'{param_norm:.6g} (config.divergence.max_update_ratio)'
      )
    return '; '.join(reasons)

  def _stop(self, what: str, nonfinite: bool, by_action: bool, key: str):
    self._ckpt.wait()  # pending saves (and the deletions they trigger) finish first
    if by_action:
      reason = f'config.{key}=stop'
      fix = '--config.on_nonfinite=skip' if nonfinite else '--config.divergence.action=skip'
    else:
      reason = f'{self._consecutive} consecutive skipped steps (config.max_consecutive_skips)'
      fix = None
    error = NonFiniteError if nonfinite else DivergenceError
    advice = resume_advice(self._ckpt.directory, self._ckpt.manager.all_steps(), self.trusted, fix)
    raise error(f'{what}; stopped by {reason}. The update was not applied; {advice}')

  # --- what a checkpoint and the summary keep ------------------------------------------------

  def meta(self) -> dict:
    """The guard's state for the checkpoint meta (JSON): a resumed run decides the same."""
    return {
      'nonfinite_skipped': self.nonfinite_skipped,
      'guard': {
        'divergence_skipped': self.divergence_skipped,
        'trusted': self.trusted,
        'consecutive': self._consecutive,
        'passed': self._passed,
        'history': [list(x) for x in self._history],
      },
    }

  def summary(self) -> dict:
    return {
      'nonfinite_skipped': self.nonfinite_skipped,
      'divergence_skipped': self.divergence_skipped,
    }


def resume_advice(directory: str, saved_steps: Sequence[int], trusted: int, fix=None) -> str:
  """Names the newest saved checkpoint at or below `trusted` and how to resume from it.

  directory: WORKDIR/checkpoints; saved_steps: the steps retained there; fix: a flag that
  would let the run go on past such steps, if any.
  """
  saved = sorted(int(s) for s in saved_steps)
  good = [s for s in saved if s <= trusted]
  lower_lr = 'a lower --config.optim.lr'
  if not good:
    if not saved:
      return 'no checkpoint was saved yet.'
    return (
      f'no checkpoint passed the guard (those in {directory} hold the diverging params): '
      f'start again in a new --workdir with a change (e.g. {lower_lr}).'
    )
  last = good[-1]
  later = [s for s in saved if s > last]
  text = (
    f'the last good checkpoint is step {last} in {directory} (every step up to it passed the '
    'guard). To resume from it, '
  )
  if later:
    text += f'move the later ones aside ({move_aside_command(directory, later)}), then '
  # A rerun of the same config repeats the same steps exactly, blow-up included.
  change = f'{lower_lr} with --config.checkpoint.allow_config_change=True'
  change = f'{fix}, or {change}' if fix else change
  return f'{text}rerun with a change ({change}).'


def move_aside_command(directory: str, steps: Sequence[int]) -> str:
  """The shell command that moves the checkpoints `steps` of `directory` to a sibling
  'diverged' folder (kept for inspection), so that a rerun resumes below them."""
  aside = os.path.join(os.path.dirname(directory.rstrip('/')), 'diverged')
  sources = [os.path.join(directory, str(s)) for s in steps]
  if directory.startswith('gs://'):
    return ' && '.join(f'gcloud storage mv {s} {aside}/{os.path.basename(s)}' for s in sources)
  if fileio.is_remote(directory):
    return f'{", ".join(sources)} to {aside}/'
  return f'mkdir -p {aside} && mv {" ".join(sources)} {aside}/'
