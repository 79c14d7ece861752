"""Learning-rate, weight-decay and EMA-momentum schedules: pure functions of the global step.

They reproduce the official I-JEPA schedulers exactly, including their off-by-one: the official
`scheduler.step()` runs before each optimiser step, so optimiser step s (0-based) uses the
schedule's value at s + 1, while the EMA momentum generator yields its value at s.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class Schedules:
  """All schedule constants, resolved from the config and the steps per epoch."""

  warmup_steps: int
  horizon: int  # T = ipe_scale * epochs * steps_per_epoch
  start_lr: float
  lr: float
  final_lr: float
  constant_lr_after: int  # -1 = never (StoP ViT-H holds the LR after epoch 250)
  weight_decay: float
  final_weight_decay: float
  ema_start: float
  ema_end: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedules:
    o = config.optim
    const = o.constant_lr_after_epoch
    return cls(
      warmup_steps=int(o.warmup_epochs * steps_per_epoch),
      horizon=int(o.ipe_scale * o.epochs * steps_per_epoch),
      start_lr=o.start_lr,
      lr=o.lr,
      final_lr=o.final_lr,
      constant_lr_after=int(const * steps_per_epoch) if const >= 0 else -1,
      weight_decay=o.weight_decay,
      final_weight_decay=o.final_weight_decay,
      ema_start=o.ema_start,
      ema_end=o.ema_end,
    )

  def learning_rate(self, step):
    """Linear warmup start_lr -> lr, then cosine to final_lr over the rest of the horizon."""
    s = jnp.asarray(step, jnp.float32) + 1.0
    if self.constant_lr_after >= 0:
      s = jnp.minimum(s, self.constant_lr_after + 1.0)
    warm = self.start_lr + s / max(1, self.warmup_steps) * (self.lr - self.start_lr)
    # Clamped so that steps past the horizon stay at final_lr (the official code never gets
    # there, but `total_steps` may run longer than the schedule).
    progress = jnp.minimum(1.0, (s - self.warmup_steps) / max(1, self.horizon - self.warmup_steps))
    cos = self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(s < self.warmup_steps, warm, jnp.maximum(self.final_lr, cos))

  def weight_decay_at(self, step):
    """Cosine from weight_decay to final_weight_decay over the horizon, clamped at the end."""
    s = jnp.asarray(step, jnp.float32) + 1.0
    lo, hi = self.weight_decay, self.final_weight_decay
    wd = hi + (lo - hi) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(1.0, s / self.horizon)))
    return jnp.maximum(hi, wd) if hi <= lo else jnp.minimum(hi, wd)

  def momentum(self, step):
    """EMA momentum, linear from ema_start to ema_end over the horizon."""
    s = jnp.asarray(step, jnp.float32)
    m = self.ema_start + s * (self.ema_end - self.ema_start) / self.horizon
    return jnp.minimum(m, self.ema_end)
