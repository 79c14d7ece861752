"""Fine-tuning math (MAE/BEiT recipe), pure: the classifier, layer-wise LR decay, AdamW, the
warmup-cosine LR, Mixup/CutMix and label smoothing on the device, and the train/eval steps.

References: MAE `main_finetune.py`, `util/lr_decay.py` (param_groups_lrd), `util/lr_sched.py`;
timm `data/mixup.py` (Mixup, mode 'batch') and `loss/cross_entropy.py`.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from stop_jax.train import step as step_lib


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any  # {'encoder': ..., 'fc_norm': ..., 'head': ...}
  opt_state: optax.OptState
  # The BatchNorm head's running mean / var ({'head_bn': {'mean', 'var'}}); {} without one.
  batch_stats: Any


class Classifier(nn.Module):
  """The encoder, its tokens average-pooled, a norm and a linear head. The encoder keeps its
  own final norm, so every pretrained weight is used.

  head_norm 'layernorm': MAE's global_pool head (`fc_norm` then `head`). 'batchnorm': an
  affine-free BatchNorm (`head_bn`, momentum 0.9, running stats in the 'batch_stats'
  collection) then `head`, as MAE's linear-probe head; it standardises each feature across
  images, which removes the component every image shares (LayerNorm keeps it).
  """

  encoder: nn.Module
  num_classes: int
  head_init_std: float = 2e-5
  head_norm: str = 'layernorm'

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: normalised [B, H, W, 3] -> float32 logits [B, num_classes]."""
    x = self.encoder(images, train=train)  # [B, N, D]
    x = jnp.mean(x.astype(jnp.float32), axis=1)  # [B, D]
    if self.head_norm == 'batchnorm':
      # Batch statistics over the global batch (jit sees the sharded batch as one array).
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-6,
        use_bias=False,
        use_scale=False,
        # Two-pass variance: the shared part this norm exists to remove is large, and
        # E[x^2] - E[x]^2 would cancel catastrophically in float32.
        use_fast_variance=False,
        name='head_bn',
      )(x)
    else:
      x = nn.LayerNorm(epsilon=1e-6, name='fc_norm')(x)
    init = nn.initializers.truncated_normal(self.head_init_std)
    return nn.Dense(self.num_classes, kernel_init=init, name='head')(x)


# --- Layer-wise LR decay -----------------------------------------------------------------------


def layer_ids(params, depth: int):
  """MAE's `get_layer_id_for_vit` for every leaf: 0 patch embedding, i + 1 block i, depth + 1
  the rest (final norm, fc_norm, head). Scanned blocks (leading [depth] axis) get an int array
  [depth]."""

  def one(path, leaf):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names[0] != 'encoder':
      return depth + 1
    if names[1] == 'patch_embed':
      return 0
    if names[1] == 'blocks':
      if names[2] == 'layers':  # nn.scan: params stacked on axis 0
        return jnp.arange(1, depth + 1)
      return int(names[2].split('_')[-1]) + 1  # 'layers_i'
    return depth + 1

  return jax.tree_util.tree_map_with_path(one, params)


def llrd_scales(params, depth: int, decay: float):
  """Each leaf's LR factor decay^(depth + 1 - layer id), broadcastable against the leaf."""

  def scale(ids, leaf):
    s = jnp.asarray(decay, jnp.float32) ** (depth + 1 - jnp.asarray(ids, jnp.float32))
    return s.reshape(s.shape + (1,) * (leaf.ndim - s.ndim))

  return jax.tree.map(scale, layer_ids(params, depth), params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by its factor: the same as a torch param group's LR times it,
  for AdamW's decoupled decay too (both terms of the update carry the group LR)."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def lr_schedule(peak: float, min_lr: float, warmup_steps: int, total_steps: int):
  """MAE's per-iteration LR: linear from 0 over warmup, then half-cosine to min_lr at the end."""

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(t, 0.0, 1.0)))
    return jnp.where(step < warmup_steps, warm, cos)

  return lr


def make_optimizer(f, schedule, scales) -> optax.GradientTransformation:
  """[clipping] -> AdamW (no decay on biases and norms) -> layer-wise LR factors.

  f: config.finetune; schedule: step -> LR; scales: `llrd_scales`.
  """
  parts = [step_lib.clip_by_global_norm(f.grad_clip_norm)] if f.grad_clip_norm > 0 else []
  parts.append(
    optax.adamw(
      schedule, b1=f.b1, b2=f.b2, eps=1e-8, weight_decay=f.weight_decay, mask=step_lib.decay_mask
    )
  )
  parts.append(scale_by_tree(scales))
  return optax.chain(*parts)


# --- Mixup / CutMix and the loss -------------------------------------------------------------


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """timm: off = smoothing / C, on = 1 - smoothing + off. int [B] -> float32 [B, C]."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng, lam, height: int, width: int):
  """timm's rand_bbox: a box of side sqrt(1 - lam) of the image's, centred uniformly, clipped.

  Returns (bool [H, W] box mask, the area-corrected lam = 1 - box area / image area).
  """
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy, cx = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch // 2, 0, height)
  x0, x1 = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  return box, 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)


def mixup_cutmix(rng, images, targets, mixup: float, cutmix: float, prob: float, switch: float):
  """timm Mixup (mode 'batch'): one lam per batch, each row mixed with the reversed batch.

  Args:
    rng: key of this step.
    images: [B, H, W, C]; targets: float [B, K] (smoothed one-hot).
    mixup, cutmix: Beta alphas (0 = off); prob: chance the batch is mixed at all; switch:
      chance of CutMix instead of Mixup when both are on.
  Returns:
    (images [B, H, W, C], targets [B, K] = lam t + (1 - lam) t[::-1], lam).
  """
  if mixup <= 0 and cutmix <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(k_apply) < prob
  if mixup > 0 and cutmix > 0:
    use_cut = jax.random.uniform(k_switch) < switch
  else:
    use_cut = jnp.asarray(cutmix > 0)
  lam_mix = jax.random.beta(k_mix, mixup, mixup) if mixup > 0 else jnp.ones(())
  lam_cut = jax.random.beta(k_cut, cutmix, cutmix) if cutmix > 0 else jnp.ones(())
  box, lam_box = cutmix_box(k_box, lam_cut, images.shape[1], images.shape[2])
  other = images[::-1]
  mixed = jnp.where(use_cut, jnp.where(box[None, :, :, None], other, images), 0)
  mixed = mixed + jnp.where(use_cut, 0, lam_mix * images + (1.0 - lam_mix) * other)
  lam = jnp.where(apply, jnp.where(use_cut, lam_box, lam_mix), 1.0).astype(jnp.float32)
  images = jnp.where(apply, mixed, images).astype(images.dtype)
  return images, lam * targets + (1.0 - lam) * targets[::-1], lam


def soft_cross_entropy(logits, targets):
  """mean_b sum_k -t_bk log softmax(logits)_bk (timm SoftTargetCrossEntropy). [B, K] -> []."""
  return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32)), -1))


# --- Steps -----------------------------------------------------------------------------------


def make_train_step(model: Classifier, tx, f, schedule):
  """(state, batch {'image', 'label'}, rng) -> (state, metrics); f: config.finetune."""
  num_classes = model.num_classes

  def train_step(state: FinetuneState, batch, rng):
    k_mix, k_drop = jax.random.split(jax.random.fold_in(rng, state.step))
    targets = smooth_one_hot(batch['label'], num_classes, f.label_smoothing)
    images, targets, lam = mixup_cutmix(
      k_mix, batch['image'], targets, f.mixup, f.cutmix, f.mixup_prob, f.mixup_switch_prob
    )

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      logits, updated = model.apply(
        variables, images, train=True, rngs={'dropout': k_drop}, mutable=['batch_stats']
      )
      return soft_cross_entropy(logits, targets), updated.get('batch_stats', {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      'loss': loss,
      'lr': schedule(state.step),
      'grad_norm': optax.tree.norm(grads),
      'mix_lambda': lam,
    }
    return FinetuneState(state.step + 1, params, opt_state, batch_stats), metrics

  return train_step


def make_eval_step(model: Classifier, top: int = 5):
  """(params, batch_stats, batch {'image', 'label', 'valid'}) -> int32 [3]: top-1 hits, top-k
  hits and valid rows, over the global batch."""

  def eval_step(params, batch_stats, batch):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'])
    _, idx = jax.lax.top_k(logits, min(top, logits.shape[-1]))  # [B, k]
    hit = idx == batch['label'][:, None]
    valid = batch['valid']
    return jnp.stack(
      [jnp.sum(hit[:, 0] & valid), jnp.sum(jnp.any(hit, -1) & valid), jnp.sum(valid)]
    )

  return eval_step
