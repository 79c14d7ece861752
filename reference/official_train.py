"""The official StoP / I-JEPA training step, written again in PyTorch: the reference trajectory.

Written from amirbar/StoP `main.py` (`init_opt`, the momentum generator, `train_step`) and
`src/utils.py` (`WarmupCosineSchedule`, `CosineWDSchedule` with their `fix_*_thres` holds), which
are I-JEPA's `src/train.py` / `src/utils/schedulers.py` plus the holds, the K-block targets and
the encoder-only clipping. Nothing here calls `stop_jax`: `reference/trajectory.py` drives this
step and ours with the same weights, images, masks and noise and compares them
(`tests/train/test_parity.py`, `bench/training_parity.py`).

One step, in the official order:
  1. the LR and weight-decay schedulers step (so optimiser step s uses their value at s + 1);
  2. targets: the target encoder on the whole image under no_grad (the mean of its last K
     blocks, each after the final norm), `F.layer_norm` over the features, gathered per target
     block and concatenated along the batch (block-major);
  3. the context encoder on the context tokens, the predictor (one sequence per target block);
  4. `F.smooth_l1_loss(z, h, reduction='none').mean(dim=(1, 2)).mean()`, backward;
  5. clipping (if on) of the encoder's gradients only, AdamW step over four parameter groups
     (encoder / predictor x decayed / not: biases and 1-D tensors are not decayed);
  6. the EMA of the target encoder with the momentum generator's next value (its value at s).

Needs torch (`pip install 'stop_jax[torch]'`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from reference.official_torch import apply_masks


class WarmupCosineSchedule:
  """Linear warmup start_lr -> ref_lr, then cosine to final_lr; held from `fix_lr_thres` on."""

  def __init__(self, optimizer, warmup_steps, start_lr, ref_lr, t_max, final_lr, fix_lr_thres=-1):
    self.optimizer = optimizer
    self.start_lr, self.ref_lr, self.final_lr = start_lr, ref_lr, final_lr
    self.warmup_steps = warmup_steps
    self.t_max = t_max - warmup_steps  # the cosine runs over what the warmup leaves
    self.fix_lr_thres = fix_lr_thres
    self._step = 0.0

  def _cosine(self, t):
    progress = float(t - self.warmup_steps) / float(max(1, self.t_max))
    cos = self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(self.final_lr, cos)

  def step(self) -> float:
    self._step += 1
    if self._step < self.warmup_steps:
      progress = float(self._step) / float(max(1, self.warmup_steps))
      new_lr = self.start_lr + progress * (self.ref_lr - self.start_lr)
    elif self._step < self.fix_lr_thres or self.fix_lr_thres < 0:
      new_lr = self._cosine(self._step)
    else:  # fix_strategy 'const': the value the cosine had at the threshold
      new_lr = self._cosine(self.fix_lr_thres)
    for group in self.optimizer.param_groups:
      group['lr'] = new_lr
    return new_lr


class CosineWDSchedule:
  """Cosine ref_wd -> final_wd over t_max, clamped; held from `fix_wd_thres` on; never touches
  the groups marked WD_exclude."""

  def __init__(self, optimizer, ref_wd, t_max, final_wd, fix_wd_thres=-1):
    self.optimizer = optimizer
    self.ref_wd, self.final_wd, self.t_max = ref_wd, final_wd, t_max
    self.fix_wd_thres = fix_wd_thres
    self._step = 0.0

  def _cosine(self, t):
    progress = t / self.t_max
    return self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (
      1.0 + math.cos(math.pi * progress)
    )

  def step(self) -> float:
    self._step += 1
    if self._step < self.fix_wd_thres or self.fix_wd_thres < 0:
      new_wd = self._cosine(self._step)
    else:
      new_wd = self._cosine(float(self.fix_wd_thres))
    if self.final_wd <= self.ref_wd:
      new_wd = max(self.final_wd, new_wd)
    else:
      new_wd = min(self.final_wd, new_wd)
    for group in self.optimizer.param_groups:
      if not group.get('WD_exclude', False):
        group['weight_decay'] = new_wd
    return new_wd


def momentum_schedule(ipe: int, epochs: float, ipe_scale: float, ema=(0.996, 1.0)):
  """The official generator: value i is used by optimiser step i (not i + 1)."""
  increment = (ema[1] - ema[0]) / (ipe * epochs * ipe_scale)
  return (ema[0] + increment * i for i in range(int(ipe * epochs * ipe_scale) + 1))


def param_groups(encoder: nn.Module, predictor: nn.Module) -> list[dict]:
  """`init_opt`'s four groups: weight decay on everything but biases and 1-D tensors."""

  def pick(module, decayed):
    return [
      p for n, p in module.named_parameters() if (('bias' not in n) and (p.ndim != 1)) == decayed
    ]

  return [
    {'params': pick(encoder, True)},
    {'params': pick(predictor, True)},
    {'params': pick(encoder, False), 'WD_exclude': True, 'weight_decay': 0},
    {'params': pick(predictor, False), 'WD_exclude': True, 'weight_decay': 0},
  ]


@dataclasses.dataclass
class Recipe:
  """The yaml's `optimization` values (and `meta.target_blocks`), with ipe = steps per epoch."""

  ipe: int
  epochs: float
  warmup: float
  start_lr: float
  lr: float
  final_lr: float
  weight_decay: float
  final_weight_decay: float
  ipe_scale: float = 1.0
  fix_lr_thres: float = -1
  fix_wd_thres: float = -1
  ema: tuple[float, float] = (0.996, 1.0)
  clip_grad: float = 0.0
  target_blocks: int = 1


class OfficialTraining:
  """Encoder, target encoder, predictor, AdamW and the three schedules, stepped as `main.py`."""

  def __init__(self, encoder, target_encoder, predictor, recipe: Recipe):
    self.encoder, self.target_encoder, self.predictor = encoder, target_encoder, predictor
    self.recipe = r = recipe
    for p in target_encoder.parameters():
      p.requires_grad = False
    self.optimizer = torch.optim.AdamW(param_groups(encoder, predictor))
    t_max = int(r.ipe_scale * r.epochs * r.ipe)
    self.scheduler = WarmupCosineSchedule(
      self.optimizer,
      int(r.warmup * r.ipe),
      r.start_lr,
      r.lr,
      t_max,
      r.final_lr,
      fix_lr_thres=r.fix_lr_thres * r.ipe,
    )
    self.wd_scheduler = CosineWDSchedule(
      self.optimizer, r.weight_decay, t_max, r.final_weight_decay, r.fix_wd_thres * r.ipe
    )
    self.momentum = momentum_schedule(r.ipe, r.epochs, r.ipe_scale, r.ema)

  def step(self, imgs, masks_enc, masks_pred, noise=None, ctx_noise=None) -> dict[str, float]:
    """One official step. imgs [B, 3, H, W]; masks_enc [[B, Kc]]; masks_pred n x [B, Kt];
    noise n x [B, Kt, De] or None (the mask token); ctx_noise [B, Kc, De] or None."""
    lr = self.scheduler.step()
    wd = self.wd_scheduler.step()
    with torch.no_grad():
      h = self.target_encoder(imgs, K=self.recipe.target_blocks)
      h = F.layer_norm(h, (h.size(-1),))  # over the feature dim, no affine, eps 1e-5
      h = apply_masks(h, masks_pred).repeat_interleave(len(masks_enc), dim=0)
    z = self.encoder(imgs, masks_enc)
    z = self.predictor(z, masks_enc, masks_pred, noise=noise, ctx_noise=ctx_noise)
    loss = F.smooth_l1_loss(z, h, reduction='none').mean(dim=(1, 2)).mean()
    loss.backward()
    clip_norm = float('nan')
    if self.recipe.clip_grad > 0:
      clip_norm = float(nn.utils.clip_grad_norm_(self.encoder.parameters(), self.recipe.clip_grad))
    self.optimizer.step()
    self.optimizer.zero_grad()
    with torch.no_grad():
      m = next(self.momentum)
      for q, k in zip(self.encoder.parameters(), self.target_encoder.parameters(), strict=True):
        k.mul_(m).add_((1.0 - m) * q.detach())
    return {'loss': loss.item(), 'lr': lr, 'wd': wd, 'momentum': m, 'encoder_grad_norm': clip_norm}

  def adam_moments(self) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{'exp_avg' | 'exp_avg_sq': {'encoder' | 'predictor': state-dict-like {name: tensor}}},
    for the parameters AdamW has state for (those that ever had a gradient)."""
    out = {'exp_avg': {}, 'exp_avg_sq': {}}
    for part, module in (('encoder', self.encoder), ('predictor', self.predictor)):
      for moment in out:
        out[moment][part] = {
          n: self.optimizer.state[p][moment].detach().clone()
          for n, p in module.named_parameters()
          if p in self.optimizer.state
        }
    return out
