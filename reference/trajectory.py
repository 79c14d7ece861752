"""N steps of our training against N steps of the official training, from the same start.

Both sides get the same initial weights (official-layout torch modules with the official init
plus random biases / norm affines / mask token, so that every tensor matters, converted to ours
by `stop_jax.tools.convert`), the same images, **our** masks (`masking.sample_masks` in
'official' mode, with token counts every mask of the run fills, so neither side pads: the
official code cannot) and **our** StoP noise (drawn by our predictor from the step's 'stop' key
and handed to the torch predictor). What the official side adds by itself is everything else:
its schedulers, parameter groups, AdamW, clipping, targets, loss and EMA
(`reference/official_train.py`).

`run_pair` returns the per-step losses of both and, after the last step, the relative difference
of every parameter, Adam moment and EMA-target tensor (each side's in our layout). The
schedules are compressed into the run: warmup, the cosine, the LR / WD holds and a wide EMA
momentum range (0.9 -> 1.0, so that an off-by-one in the momentum shows) all happen within it.
Used by `tests/train/test_parity.py` and `bench/training_parity.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import torch

from reference import official_torch, official_train
from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.data import masking
from stop_jax.tools import convert
from stop_jax.train import step as step_lib
from stop_jax.train.schedules import Schedules

NOISE_ON_MASKED = ('masked', 'both')  # modes whose masked tokens are A n_j + b + psi_j
NOISE_ON_CONTEXT = ('context', 'both')


@dataclasses.dataclass(frozen=True)
class Setting:
  """One parity run: the factors the issue varies, and the compressed schedule."""

  patch: int = 16
  mode: str = 'masked'  # masked | off | context | both
  target_layers: int = 1
  clip: float = 0.0  # encoder-only global-norm clip (0 = off)
  steps_per_epoch: int = 3
  epochs: int = 10  # 30 steps
  batch: int = 4
  seed: int = 0

  @property
  def name(self) -> str:
    return f'p{self.patch}_{self.mode}_k{self.target_layers}_clip{self.clip:g}'


def parity_config(s: Setting) -> ml_collections.ConfigDict:
  """A small float32 ViT (8x8 patch grid) and the official recipe compressed into the run."""
  c = config_lib.base_config()
  c.seed = s.seed
  c.model.variant = 'tiny'
  c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_ratio = 64, 4, 4, 4.0
  c.model.patch_size, c.model.image_size = s.patch, 8 * s.patch
  c.model.attention = 'einsum'
  c.predictor.width, c.predictor.depth, c.predictor.num_heads = 32, 2, 4
  c.stop.mode, c.stop.sigma = s.mode, 0.25
  c.mask.mode = 'official'
  c.mask.min_keep = 4  # the 8x8 grid's smallest target blocks have 9 tokens
  c.loss.num_target_layers = s.target_layers
  c.data.global_batch_size = s.batch
  o = c.optim
  o.epochs, o.warmup_epochs = s.epochs, 2
  o.start_lr, o.lr, o.final_lr = 2e-4, 2e-3, 2e-4
  o.weight_decay, o.final_weight_decay = 0.04, 0.4
  o.constant_lr_after_epoch = o.constant_wd_after_epoch = s.epochs - 2
  o.ema_start, o.ema_end = 0.9, 1.0
  o.grad_clip_norm = s.clip
  return config_lib.lock(c)


def official_recipe(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The same recipe in the official yaml's terms."""
  o = config.optim
  return official_train.Recipe(
    ipe=steps_per_epoch,
    epochs=o.epochs,
    warmup=o.warmup_epochs,
    start_lr=o.start_lr,
    lr=o.lr,
    final_lr=o.final_lr,
    weight_decay=o.weight_decay,
    final_weight_decay=o.final_weight_decay,
    ipe_scale=o.ipe_scale,
    fix_lr_thres=o.constant_lr_after_epoch,
    fix_wd_thres=o.constant_wd_after_epoch,
    ema=(o.ema_start, o.ema_end),
    clip_grad=o.grad_clip_norm,
    target_blocks=config.loss.num_target_layers,
  )


def run_masks(config: ml_collections.ConfigDict, steps: int) -> list[dict[str, np.ndarray]]:
  """Our masks for every step, with K_ctx / K_tgt = the smallest counts of the run.

  In 'official' mode the sampler keeps the first K tokens in raster order, which is what the
  official truncation to the batch minimum keeps; with K at the run's minimum no slot is padding.
  """
  spec = masking.spec_from_config(config)
  full = dataclasses.replace(
    spec, num_context_tokens=spec.num_patches, num_target_tokens=spec.num_patches
  )
  batch = config.data.global_batch_size
  raw = [masking.sample_masks(full, config.seed, t, batch) for t in range(steps)]
  k_ctx = min(int(m['ctx_valid'].sum(-1).min()) for m in raw)
  k_tgt = min(int(m['tgt_valid'].sum(-1).min()) for m in raw)
  spec = dataclasses.replace(spec, num_context_tokens=k_ctx, num_target_tokens=k_tgt)
  masks = [masking.sample_masks(spec, config.seed, t, batch) for t in range(steps)]
  assert all(m['ctx_valid'].all() and m['tgt_valid'].all() for m in masks)
  return masks


def _torch_start(config: ml_collections.ConfigDict, seed: int) -> dict[str, torch.nn.Module]:
  """Official-layout modules with the official init and random biases / norm affines / mask
  token (zero or one at init, where a wrong rule for them would not show)."""
  torch.manual_seed(seed)
  mods = official_torch.official_modules(config)
  official_torch.init_official(mods['encoder'])
  official_torch.init_official(mods['predictor'])
  with torch.no_grad():
    for mod in (mods['encoder'], mods['predictor']):
      for name, w in mod.named_parameters():
        if name.endswith('norm1.weight') or name.endswith('norm2.weight') or 'norm.weight' in name:
          w.copy_(1 + 0.2 * torch.randn_like(w))
        elif name.endswith('bias') or name == 'mask_token':
          w.copy_(0.05 * torch.randn_like(w))
  mods['target_encoder'].load_state_dict(mods['encoder'].state_dict())  # the official deepcopy
  return mods


def _numpy(state_dict) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in state_dict.items()}


def _noise_fn(predictor, width: int, mode: str):
  """Jitted (params, batch, stop_rng) -> the StoP noise our predictor draws for this step's key:
  (masked [n, B, Kt, d_e] or None, context [B, Kc, d_e] or None). The draws depend on the key
  and the shapes only."""
  return jax.jit(lambda params, batch, rng: _noise(predictor, params, batch, rng, width, mode))


def _noise(predictor, params, batch, stop_rng, width: int, mode: str):
  ctx = jnp.zeros(batch['ctx_idx'].shape + (width,), jnp.float32)
  _, state = predictor.apply(
    {'params': params},
    ctx,
    batch['ctx_idx'],
    batch['tgt_idx'],
    batch['ctx_valid'],
    batch['tgt_valid'],
    rngs={'stop': stop_rng},
    mutable=['intermediates', 'stats'],
  )
  found = state.get('intermediates', {})
  masked = found['noise'][0] if mode in NOISE_ON_MASKED else None
  context = found['ctx_noise'][0] if mode in NOISE_ON_CONTEXT else None
  return masked, context


def _adam_moments(opt_state):
  """(mu, nu) of our AdamW, wherever the chain keeps them."""
  found = [
    s
    for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
    )
    if isinstance(s, optax.ScaleByAdamState)
  ]
  assert len(found) == 1, found
  return found[0].mu, found[0].nu


def _relative(ours, theirs) -> dict[str, float]:
  """Per-leaf max |a - b| / max |b| over two trees with the same keys (flattened paths)."""
  flat_a = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
  assert set(flat_a) == set(flat_b), set(flat_a) ^ set(flat_b)
  out = {}
  for path, a in flat_a.items():
    a, b = np.asarray(a, np.float64), np.asarray(flat_b[path], np.float64)
    assert a.shape == b.shape, (path, a.shape, b.shape)
    out[jax.tree_util.keystr(path)] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
  return out


def run_pair(setting: Setting) -> dict:
  """Runs both trainings for `epochs * steps_per_epoch` steps and compares them.

  Returns:
    {'ours': [loss per step], 'official': [...], 'loss_rel': [per step],
     'tensors': {family: {leaf: rel diff}}, 'noise_std': [per step], 'clipped_steps': int,
     'k_ctx', 'k_tgt'}; families: encoder, predictor (params), target (EMA), mu, nu (Adam).
  """
  config = parity_config(setting)
  steps = setting.epochs * setting.steps_per_epoch
  encoder, predictor = models.build_encoder(config), models.build_predictor(config)
  mods = _torch_start(config, setting.seed)
  start = convert.convert_state_dicts({k: _numpy(m.state_dict()) for k, m in mods.items()}, config)
  tx = step_lib.make_optimizer(config)
  schedules = Schedules.from_config(config, setting.steps_per_epoch)
  params = {'encoder': start['encoder'], 'predictor': start['predictor']}
  state = step_lib.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    target_params=start['target_encoder'],
    opt_state=tx.init(params),
  )
  train_step = jax.jit(step_lib.make_train_step(config, encoder, predictor, tx, schedules))
  official = official_train.OfficialTraining(
    mods['encoder'],
    mods['target_encoder'],
    mods['predictor'],
    official_recipe(config, setting.steps_per_epoch),
  )
  rng = jax.random.key(setting.seed)
  images_rng = np.random.default_rng(setting.seed)
  width, size = config_lib.vit_shape(config.model)[0], config.model.image_size
  masks = run_masks(config, steps)
  draw_noise = _noise_fn(predictor, width, setting.mode)
  ours, theirs, noise_std, clipped = [], [], [], 0
  for t in range(steps):
    images = images_rng.normal(size=(setting.batch, size, size, 3)).astype(np.float32)
    batch = {'image': jnp.asarray(images), **{k: jnp.asarray(v) for k, v in masks[t].items()}}
    stop_rng = step_lib.stream_key(rng, t, step_lib.STOP_STREAM)
    noise, ctx_noise = jax.tree.map(
      np.array, draw_noise(state.params['predictor'], batch, stop_rng)
    )
    if noise is not None:
      noise_std.append(float(noise.std()))
    state, metrics = train_step(state, batch, rng)
    ours.append(float(metrics['loss']))
    out = official.step(
      torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
      [torch.from_numpy(masks[t]['ctx_idx']).long()],
      [torch.from_numpy(m).long() for m in masks[t]['tgt_idx']],
      noise=None if noise is None else [torch.from_numpy(n) for n in noise],
      ctx_noise=None if ctx_noise is None else torch.from_numpy(ctx_noise),
    )
    theirs.append(out['loss'])
    clipped += int(out['encoder_grad_norm'] > setting.clip > 0)

  final = {k: _numpy(m.state_dict()) for k, m in mods.items()}
  moments = official.adam_moments()
  to_ours = lambda parts: convert.convert_state_dicts(  # noqa: E731
    {k: {n: t.numpy() for n, t in v.items()} for k, v in parts.items()}, config
  )
  theirs_params = convert.convert_state_dicts(final, config)
  mu, nu = _adam_moments(state.opt_state)
  tensors = {
    'encoder': _relative(state.params['encoder'], theirs_params['encoder']),
    'predictor': _relative(state.params['predictor'], theirs_params['predictor']),
    'target': _relative(state.target_params, theirs_params['target_encoder']),
    'mu': _relative(mu, to_ours(moments['exp_avg'])),
    'nu': _relative(nu, to_ours(moments['exp_avg_sq'])),
  }
  loss_rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)]
  return {
    'setting': setting.name,
    'ours': ours,
    'official': theirs,
    'loss_rel': loss_rel,
    'tensors': tensors,
    'noise_std': noise_std,
    'clipped_steps': clipped,
    'k_ctx': int(masks[0]['ctx_idx'].shape[1]),
    'k_tgt': int(masks[0]['tgt_idx'].shape[2]),
  }
