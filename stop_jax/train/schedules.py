"""Learning-rate, weight-decay and EMA-momentum schedules: pure functions of the global step.

They reproduce the official StoP schedulers (`WarmupCosineSchedule`, `CosineWDSchedule` and the
momentum generator of amirbar/StoP `main.py` / `src/utils.py`, I-JEPA's plus the constant holds)
exactly, including their off-by-one: the official `scheduler.step()` runs before each optimiser
step, so optimiser step s (0-based) uses the schedulers' value at t = s + 1, while the EMA
momentum generator yields its value at s. `tests/train/test_recipes.py` checks every recipe
against the official formulas; `tests/train/test_parity.py` checks whole trajectories.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class Schedules:
  """All schedule constants, resolved from the config and the steps per epoch."""

  warmup_steps: int  # int(warmup_epochs * steps_per_epoch), as the official int(warmup * ipe)
  horizon: int  # T = int(ipe_scale * epochs * steps_per_epoch)
  start_lr: float
  lr: float
  final_lr: float
  # From scheduler step t >= this on, the LR keeps its value at t = this (-1 = never): the
  # official `fix_lr_thres * ipe` with `fix_lr_strategy: const` (StoP ViT-H: 250 epochs).
  constant_lr_after: float
  weight_decay: float
  final_weight_decay: float
  constant_wd_after: float  # The same hold for the weight decay (`fix_wd_thres`).
  ema_start: float
  ema_end: float
  # The momentum generator's denominator, ipe * epochs * ipe_scale, not rounded (official).
  ema_horizon: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedules:
    o = config.optim

    def hold(epochs):
      return epochs * steps_per_epoch if epochs >= 0 else -1.0

    return cls(
      warmup_steps=int(o.warmup_epochs * steps_per_epoch),
      horizon=int(o.ipe_scale * o.epochs * steps_per_epoch),
      start_lr=o.start_lr,
      lr=o.lr,
      final_lr=o.final_lr,
      constant_lr_after=hold(o.constant_lr_after_epoch),
      weight_decay=o.weight_decay,
      final_weight_decay=o.final_weight_decay,
      constant_wd_after=hold(o.constant_wd_after_epoch),
      ema_start=o.ema_start,
      ema_end=o.ema_end,
      ema_horizon=steps_per_epoch * o.epochs * o.ipe_scale,
    )

  def learning_rate(self, step):
    """Linear warmup start_lr -> lr, then cosine to final_lr over the rest of the horizon."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    warm = self.start_lr + t / max(1, self.warmup_steps) * (self.lr - self.start_lr)
    if self.constant_lr_after >= 0:
      # The hold applies after warmup only: the official code tests `t < warmup` first.
      t = jnp.minimum(t, self.constant_lr_after)
    # Clamped so that steps past the horizon stay at final_lr (the official code never gets
    # there, but `total_steps` may run longer than the schedule).
    progress = jnp.minimum(1.0, (t - self.warmup_steps) / max(1, self.horizon - self.warmup_steps))
    cos = self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    first = jnp.asarray(step, jnp.float32) + 1.0 < self.warmup_steps
    return jnp.where(first, warm, jnp.maximum(self.final_lr, cos))

  def weight_decay_at(self, step):
    """Cosine from weight_decay to final_weight_decay over the horizon, clamped at the end."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    if self.constant_wd_after >= 0:
      t = jnp.minimum(t, self.constant_wd_after)
    lo, hi = self.weight_decay, self.final_weight_decay
    wd = hi + (lo - hi) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(1.0, t / self.horizon)))
    return jnp.maximum(hi, wd) if hi <= lo else jnp.minimum(hi, wd)

  def momentum(self, step):
    """EMA momentum, linear from ema_start to ema_end over the horizon (value at s, not s+1)."""
    s = jnp.asarray(step, jnp.float32)
    m = self.ema_start + s * (self.ema_end - self.ema_start) / self.ema_horizon
    return jnp.minimum(m, self.ema_end)
