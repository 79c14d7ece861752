"""The recipe configs against the official yamls: every schedule value at the steps that matter.

The official values are written here as data, with the file each comes from; the official
formulas (amirbar/StoP `src/utils.py` `WarmupCosineSchedule` / `CosineWDSchedule` with their
`fix_*_thres` holds, `main.py`'s momentum generator) are written here again in closed form, not
taken from `stop_jax`. ImageNet-1k at global batch 2048 gives ipe = 1281167 // 2048 = 625.
"""

import math
import os

import pytest

from stop_jax import config as config_lib
from stop_jax.train.schedules import Schedules

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IPE = 1281167 // 2048

# amirbar/StoP configs/pretrain/*.yaml (`optimization`, `meta`, `mask`, `stop_params`); the
# ablation setting is paper Table 9 plus facebookresearch/ijepa configs/in1k_vith14_ep300.yaml.
OFFICIAL = {
  'vitb16.py': dict(
    source='amirbar/StoP configs/pretrain/vit-b16.yaml',
    epochs=600,
    warmup=15,
    start_lr=2e-4,
    lr=8e-4,
    final_lr=1e-4,
    weight_decay=0.04,
    final_weight_decay=0.4,
    ipe_scale=1.0,
    fix_lr_thres=-1,
    fix_wd_thres=-1,
    clip_grad=0.0,
    target_blocks=1,
    pred_depth=6,
    patch_size=16,
    sigma=0.25,
    variant='base',
  ),
  'vitl16.py': dict(
    source='amirbar/StoP configs/pretrain/vit-l16.yaml',
    epochs=600,
    warmup=15,
    start_lr=2e-4,
    lr=8e-4,
    final_lr=1e-4,
    weight_decay=0.04,
    final_weight_decay=0.4,
    ipe_scale=1.0,
    fix_lr_thres=-1,
    fix_wd_thres=-1,
    clip_grad=0.0,
    target_blocks=1,
    pred_depth=12,
    patch_size=16,
    sigma=0.25,
    variant='large',
  ),
  'vith14.py': dict(
    source='amirbar/StoP configs/pretrain/vit-h14.yaml',
    epochs=300,
    warmup=40,
    start_lr=2e-4,
    lr=1e-3,
    final_lr=1e-6,
    weight_decay=0.04,
    final_weight_decay=0.4,
    ipe_scale=1.0,
    fix_lr_thres=250,
    fix_wd_thres=250,
    clip_grad=0.0,
    target_blocks=1,
    pred_depth=12,
    patch_size=14,
    sigma=0.2,
    variant='huge',
  ),
  'ablation.py': dict(
    source='paper Table 9 + facebookresearch/ijepa configs/in1k_vith14_ep300.yaml',
    epochs=300,
    warmup=15,
    start_lr=2e-4,
    lr=1e-3,
    final_lr=1e-6,
    weight_decay=0.04,
    final_weight_decay=0.4,
    ipe_scale=1.0,
    fix_lr_thres=-1,
    fix_wd_thres=-1,
    clip_grad=0.0,
    target_blocks=1,
    pred_depth=6,
    patch_size=16,
    sigma=0.25,
    variant='base',
  ),
}
EMA = (0.996, 1.0)  # fixed in StoP's main.py and in every I-JEPA yaml
MASK = dict(num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
            context_scale=(0.85, 1.0), min_keep=10)  # fmt: skip


def official_lr(y, t):
  """WarmupCosineSchedule after its t-th `step()` (t >= 1)."""
  warmup, t_max = (
    int(y['warmup'] * IPE),
    int(y['ipe_scale'] * y['epochs'] * IPE) - int(y['warmup'] * IPE),
  )
  thres = y['fix_lr_thres'] * IPE

  def cosine(u):
    p = (u - warmup) / max(1, t_max)
    return max(
      y['final_lr'], y['final_lr'] + (y['lr'] - y['final_lr']) * 0.5 * (1 + math.cos(math.pi * p))
    )

  if t < warmup:
    return y['start_lr'] + t / max(1, warmup) * (y['lr'] - y['start_lr'])
  if t < thres or thres < 0:
    return cosine(t)
  return cosine(thres)


def official_wd(y, t):
  """CosineWDSchedule after its t-th `step()`."""
  t_max = int(y['ipe_scale'] * y['epochs'] * IPE)
  thres = y['fix_wd_thres'] * IPE
  u = t if (t < thres or thres < 0) else thres
  wd = y['final_weight_decay'] + (y['weight_decay'] - y['final_weight_decay']) * 0.5 * (
    1 + math.cos(math.pi * u / t_max)
  )
  return (
    max(y['final_weight_decay'], wd)
    if y['final_weight_decay'] <= y['weight_decay']
    else min(y['final_weight_decay'], wd)
  )


def official_momentum(y, s):
  """The momentum generator's s-th value (used by optimiser step s)."""
  return EMA[0] + s * (EMA[1] - EMA[0]) / (IPE * y['epochs'] * y['ipe_scale'])


def _steps(y):
  """First step, around the warmup end, around epoch 250, last step (0-based optimiser steps)."""
  w, e250, last = int(y['warmup'] * IPE), 250 * IPE, int(y['epochs'] * IPE) - 1
  return sorted({0, 1, w - 2, w - 1, w, e250 - 2, e250 - 1, e250, e250 + 1, last - 1, last})


def _load(name):
  return config_lib.load_config_file(os.path.join(ROOT, 'configs', name))


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_every_schedule_value_equals_the_official_one(name):
  y, c = OFFICIAL[name], _load(name)
  s = Schedules.from_config(c, steps_per_epoch=IPE)
  for step in _steps(y):
    # Optimiser step s runs after the schedulers' (s + 1)-th step() call.
    where = f'{name} ({y["source"]}) at step {step}'
    assert float(s.learning_rate(step)) == pytest.approx(official_lr(y, step + 1), rel=1e-5), where
    assert float(s.weight_decay_at(step)) == pytest.approx(official_wd(y, step + 1), rel=1e-5), (
      where
    )
    assert float(s.momentum(step)) == pytest.approx(official_momentum(y, step), rel=1e-7), where


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_recipe_keys_equal_the_official_yaml(name):
  y, c = OFFICIAL[name], _load(name)
  assert c.model.variant == y['variant'] and c.model.patch_size == y['patch_size']
  assert (c.predictor.depth, c.predictor.width, c.stop.sigma) == (y['pred_depth'], 384, y['sigma'])
  assert c.stop.mode == 'masked' or name == 'ablation.py'
  assert c.loss.num_target_layers == y['target_blocks']
  assert c.loss.type == 'smooth_l1' and c.loss.multi_layer_target == 'norm_of_mean'
  assert c.optim.grad_clip_norm == y['clip_grad'] and c.optim.grad_clip_scope == 'encoder'
  assert (c.optim.ema_start, c.optim.ema_end) == EMA and (c.optim.b1, c.optim.b2) == (0.9, 0.999)
  # The paper's runs used the official sampler, quirks included.
  assert c.mask.mode == 'official'
  assert {
    k: tuple(v) if isinstance(v, tuple) else v for k, v in c.mask.items() if k in MASK
  } == MASK
  assert c.data.global_batch_size == 2048 and tuple(c.data.crop_scale) == (0.3, 1.0)


def test_vith14_holds_lr_and_weight_decay_after_epoch_250():
  y, c = OFFICIAL['vith14.py'], _load('vith14.py')
  s = Schedules.from_config(c, steps_per_epoch=IPE)
  held = 250 * IPE - 1  # optimiser step of the scheduler's step() number 250 * IPE
  wd = float(s.weight_decay_at(held))
  assert wd == pytest.approx(0.376, abs=5e-4)  # the ALGORITHM.md figure
  for step in (held + 1, 275 * IPE, 300 * IPE - 1):
    assert float(s.weight_decay_at(step)) == wd
    assert float(s.learning_rate(step)) == float(s.learning_rate(held))
  assert float(s.weight_decay_at(held - 1)) < wd  # still rising before the hold
  assert official_wd(y, 300 * IPE) == pytest.approx(wd, rel=1e-6)
