"""The training math: state, optimiser, targets, loss and the pure train step.

Everything here is a pure function of its arguments; the loop and I/O live in `loop.py`, the
sharding in `setup.py`. The step is `(state, batch, rng) -> (state, metrics)`: all randomness
(the StoP noise) comes from `rng` folded with the step, all schedules are functions of
`state.step`, so a resumed run recomputes exactly what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from stop_jax.train import lowres as lowres_lib
from stop_jax.train.schedules import Schedules


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken so far.
  params: Any  # {'encoder': ..., 'predictor': ...}, trained by the optimiser.
  target_params: Any  # EMA of params['encoder']; never receives gradients.
  opt_state: optax.OptState


def decay_mask(params):
  """Official rule: no weight decay on biases and 1-D params (LayerNorm scales).

  Decided by leaf name rather than ndim because `nn.scan` stacks per-block vectors into 2-D
  arrays. The mask token ([1, 1, 1, d]) is decayed, as in the official code.
  """

  def keep(path, _):
    # The last dict key is the param's name (boxed params add attribute keys after it).
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    return name not in ('bias', 'scale')

  return jax.tree_util.tree_map_with_path(keep, params)


def clip_mask(params, scope: str):
  """Which leaves the gradient clipping covers: the encoder only (official) or everything."""
  return {
    part: jax.tree.map(lambda _, on=(scope == 'all' or part == 'encoder'): on, tree)
    for part, tree in params.items()
  }


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch's `clip_grad_norm_`: g <- g * min(1, max_norm / (||g|| + 1e-6)).

  The 1e-6 is torch's; `optax.clip_by_global_norm` has none, which shifts the clipped update by
  1e-6 / ||g|| relative (a visible difference when gradient norms are small).
  """

  def update_fn(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (+ optional global-norm clipping) whose lr and wd the step sets from the schedules.

  Clipping (optim.grad_clip_norm > 0) rescales the gradients of the leaves `clip_mask` selects
  by their own global norm, as the official `clip_grad_norm_(encoder.parameters(), clip)`: by
  default the predictor's gradients are never clipped.
  """
  o = config.optim

  def chain(learning_rate, weight_decay):
    parts = []
    if o.grad_clip_norm > 0:
      clip = clip_by_global_norm(o.grad_clip_norm)
      scope = o.grad_clip_scope
      parts.append(clip if scope == 'all' else optax.masked(clip, lambda p: clip_mask(p, scope)))
    parts.append(
      optax.adamw(
        learning_rate, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=weight_decay, mask=decay_mask
      )
    )
    return optax.chain(*parts)

  # The values are overwritten every step from `Schedules` (functions of the global step), so
  # they never drift from the step count, e.g. when a step is skipped.
  return optax.inject_hyperparams(chain)(learning_rate=0.0, weight_decay=0.0)


def init_params(encoder: nn.Module, predictor: nn.Module, config, rng: jax.Array, boxed=False):
  """Initial {'encoder', 'predictor'} params from one key (shapes only depend on the config).

  boxed=True keeps the leaves wrapped in `nn.LogicallyPartitioned` (their logical axis names,
  which `sharding.tree_shardings` maps to the mesh); otherwise plain arrays.
  """
  size = config.model.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  ctx_idx = jnp.zeros((1, 1), jnp.int32)
  tgt_idx = jnp.zeros((1, 1, 1), jnp.int32)
  k_enc, k_pred, k_stop = jax.random.split(rng, 3)
  enc = encoder.init(k_enc, images, ctx_idx)['params']
  feats = jnp.zeros((1, 1, encoder.width), jnp.float32)
  coarse = {}
  if config.loss.lowres != 'none':  # creates the coarse cells' level token
    coarse = {'coarse_idx': tgt_idx, 'coarse_valid': jnp.ones(tgt_idx.shape, bool)}
  rngs = {'params': k_pred, 'stop': k_stop}
  pred = predictor.init(rngs, feats, ctx_idx, tgt_idx, **coarse)['params']
  params = {'encoder': enc, 'predictor': pred}
  return params if boxed else nn.unbox(params)


def target_dtype(config):
  return jnp.bfloat16 if config.model.target_dtype == 'bfloat16' else jnp.float32


def create_train_state(encoder, predictor, tx, config, rng, boxed=False) -> TrainState:
  """The initial state. boxed=True: leaves carry logical axis names (for sharding only)."""
  params = init_params(encoder, predictor, config, rng, boxed=True)
  dtype = target_dtype(config)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    # A copy, so the EMA buffer never aliases the trained params when the state is donated.
    target_params=jax.tree.map(lambda x: jnp.array(x, dtype=dtype), params['encoder']),
    # Initialised on the boxed params, so Adam's moments inherit their logical names too.
    opt_state=tx.init(params),
  )
  return state if boxed else nn.unbox(state)


def stochastic_round_bf16(x, key):
  """float32 -> bfloat16, rounding up with probability equal to the dropped fraction.

  Unbiased (E[round(x)] = x), so an EMA whose per-step change is far below bf16's resolution
  (momentum 0.996+ moves a weight by < 0.4% of the gap) still tracks the float32 EMA on average
  instead of freezing, as round-to-nearest would.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)  # bf16 keeps the top 16 bits of a float32
  return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def ema_update(target, online, momentum, key=None):
  """t <- m t + (1 - m) p, computed in float32 and stored in the target's dtype.

  A bfloat16 target is stochastically rounded with one key per leaf (folded from `key`).
  """
  leaves, treedef = jax.tree.flatten(target)
  new = jax.tree.leaves(
    optax.incremental_update(
      online, jax.tree.map(lambda t: t.astype(jnp.float32), target), 1.0 - momentum
    )
  )
  out = []
  for i, (t, n) in enumerate(zip(leaves, new, strict=True)):
    if t.dtype == jnp.bfloat16:
      out.append(stochastic_round_bf16(n, jax.random.fold_in(key, i)))
    else:
      out.append(n.astype(t.dtype))
  return jax.tree.unflatten(treedef, out)


def layer_norm(x, eps: float = 1e-5):
  """Parameter-free LayerNorm over the last axis, in float32.

  eps 1e-5 is the default of the official `F.layer_norm(h, (h.size(-1),))` on the targets (the
  model's own LayerNorms use 1e-6).
  """
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def target_features(encoder, target_params, images, num_layers: int = 1, combine='norm_of_mean'):
  """Layer-normed target-encoder features of all tokens, from the last `num_layers` blocks.

  K = 1 is the official target: LN(target_encoder(images)), LN the parameter-free `layer_norm`.
  For K > 1 each of the last K block outputs gets the encoder's final norm, then (`combine`,
  config loss.multi_layer_target):
    norm_of_mean   LN(mean_k norm(x_k)), the official StoP code;
    mean_of_norms  mean_k LN(norm(x_k)).

  Returns:
    float32 [B, N, D], with no gradient.
  """
  if num_layers == 1:
    out = layer_norm(encoder.apply({'params': target_params}, images))
  else:
    _, blocks = encoder.apply({'params': target_params}, images, return_blocks=True)
    last = blocks[-num_layers:].astype(jnp.float32)  # [K, B, N, D], each after the final norm
    if combine == 'norm_of_mean':
      out = layer_norm(jnp.mean(last, axis=0))
    else:
      out = jnp.mean(layer_norm(last), axis=0)
  return jax.lax.stop_gradient(out)


def gather_targets(feats, tgt_idx):
  """Each target block's tokens of the target features. [B, N, D], int [n, B, Kt] -> [n, B, Kt, D]."""
  n = tgt_idx.shape[0]
  return jnp.take_along_axis(
    jnp.broadcast_to(feats[None], (n,) + feats.shape), tgt_idx[..., None], axis=2
  )


def coarse_targets(feats, batch, grid: tuple[int, int], method: str):
  """Table 8's low-res targets (train/lowres.py): the target map downscaled 2x by `method` and
  layer-normed again, at each block's distinct coarse cells.

  Args:
    feats: float32 [B, N, D] (`target_features`); batch: 'tgt_idx' / 'tgt_valid' [n, B, Kt].
  Returns:
    (float32 [n, B, Kt, D] targets, int [n, B, Kt] coarse indices, bool [n, B, Kt] valid).
  """
  idx, valid = lowres_lib.coarse_cells(batch['tgt_idx'], batch['tgt_valid'], grid)
  coarse = layer_norm(lowres_lib.downscale(feats, grid, method))  # [B, N/4, D]
  return gather_targets(coarse, idx), idx, valid


def prediction_loss(pred, target, valid, kind: str = 'smooth_l1'):
  """Mean over valid target tokens and features.

  Args:
    pred, target: [n, B, Kt, D]; valid: bool [n, B, Kt].
  """
  diff = pred.astype(jnp.float32) - target
  if kind == 'smooth_l1':  # Huber with beta 1, as torch's F.smooth_l1_loss.
    err = jnp.where(jnp.abs(diff) < 1.0, 0.5 * jnp.square(diff), jnp.abs(diff) - 0.5)
  else:
    err = jnp.square(diff)
  w = valid.astype(jnp.float32)[..., None]
  return jnp.sum(err * w) / (jnp.maximum(jnp.sum(w), 1.0) * diff.shape[-1])


def a_penalty(a_kernel, kind: str):
  """The l1/l2 ablation penalty on A (sum over entries; scaled by stop.reg_weight)."""
  if kind == 'l1':
    return jnp.sum(jnp.abs(a_kernel))
  if kind == 'l2':
    return jnp.sum(jnp.square(a_kernel))
  return jnp.zeros((), jnp.float32)


def make_loss_fn(config, encoder, predictor):
  """Returns `loss_fn(params, batch, targets, stop_rng) -> (total, (losses, predictor stats))`.

  total = the prediction loss on the target blocks (+ loss.lowres_weight x the loss on their
  coarse cells, Table 8) + stop.reg_weight x the A penalty (ablation); losses: {'loss'} (and
  'loss_lowres').
  targets: float32 [n, B, Kt, D] (`gather_targets`), or with loss.lowres the pair (fine, coarse
  [n, B, Kq, D]) when batch also holds 'coarse_idx' / 'coarse_valid'. Differentiate w.r.t.
  params only.
  """
  loss_kind = config.loss.type
  reg_kind, reg_weight = config.stop.reg, float(config.stop.reg_weight)
  lowres_weight = float(config.loss.lowres_weight)

  def loss_fn(params, batch, targets, stop_rng):
    ctx = encoder.apply(
      {'params': params['encoder']}, batch['image'], batch['ctx_idx'], batch['ctx_valid']
    )
    coarse = {k: batch[k] for k in ('coarse_idx', 'coarse_valid') if k in batch}
    pred, aux = predictor.apply(
      {'params': params['predictor']},
      ctx,
      batch['ctx_idx'],
      batch['tgt_idx'],
      batch['ctx_valid'],
      batch['tgt_valid'],
      **coarse,
      rngs={'stop': stop_rng},
      mutable=['stats'],
    )
    reg = a_penalty(params['predictor']['predictor_embed']['kernel'], reg_kind)
    if not coarse:
      loss = prediction_loss(pred, targets, batch['tgt_valid'], loss_kind)
      return loss + reg_weight * reg, ({'loss': loss}, aux['stats'])
    loss = prediction_loss(pred[0], targets[0], batch['tgt_valid'], loss_kind)
    lowres = prediction_loss(pred[1], targets[1], batch['coarse_valid'], loss_kind)
    total = loss + lowres_weight * lowres + reg_weight * reg
    return total, ({'loss': loss, 'loss_lowres': lowres}, aux['stats'])

  return loss_fn


# The step's random streams: each is `stream_key(rng, step, stream)`, so a resumed run draws
# exactly what an uninterrupted one would.
STOP_STREAM, EMA_STREAM = 0, 1


def stream_key(rng: jax.Array, step, stream: int) -> jax.Array:
  """The key of one stream (`STOP_STREAM`: the StoP noise; `EMA_STREAM`: the bf16 EMA rounding)
  at one step, from the run's step key."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), stream)


# The step's `limits` argument (`apply_update`): float32 scalars, +inf = no limit. One pytree
# structure for every step, so the compiled step never changes with the guard's settings.
LIMIT_KEYS = ('loss', 'update_norm', 'update_ratio')
_INF = float('inf')


def step_limits(loss: float = _INF, update_norm: float = _INF, update_ratio: float = _INF) -> dict:
  """The step's `limits` as host float32 scalars: the defaults bound nothing."""
  values = (loss, update_norm, update_ratio)
  return {k: np.float32(v) for k, v in zip(LIMIT_KEYS, values, strict=True)}


def apply_update(state: TrainState, grads, total, tx, schedules: Schedules, rng, limits=None):
  """The optimiser step at the scheduled lr / wd, then the EMA target; both dropped if the
  total loss or the gradients are not finite, or if the total loss or the update's global norm
  (or its ratio to the params' norm) is above its limit. rng: the step's key (as
  `train_step`'s); limits: None (no limits) or {'loss', 'update_norm', 'update_ratio'}: float32
  [] each, the divergence guard's bounds for this step (`guard.py`; +inf = none).

  Returns:
    (params, target_params, opt_state, metrics: lr, wd, momentum, grad_norm, update_norm,
    param_norm (before the update), nonfinite, diverged).
  """
  step = state.step
  lr = schedules.learning_rate(step)
  wd = schedules.weight_decay_at(step)
  hyper = {**state.opt_state.hyperparams, 'learning_rate': lr, 'weight_decay': wd}
  opt_state = state.opt_state._replace(hyperparams=hyper)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  update_norm = optax.tree.norm(updates)  # what the step moves the params by (AdamW incl. decay)
  params = optax.apply_updates(state.params, updates)
  # EMA target after the optimiser step, as the official code: t <- m t + (1 - m) p.
  momentum = schedules.momentum(step)
  ema_rng = stream_key(rng, step, EMA_STREAM)
  target_params = ema_update(state.target_params, params['encoder'], momentum, ema_rng)
  grad_norm = optax.tree.norm(grads)
  param_norm = optax.tree.norm(state.params)
  # A non-finite loss or gradient never reaches the state: the update is dropped (the step
  # count still advances) and the host decides whether to stop or go on (config.on_nonfinite).
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  # A finite step above the guard's limits is dropped the same way (config.divergence).
  within = jnp.bool_(True)
  if limits is not None:
    within = (
      (total <= limits['loss'])
      & (update_norm <= limits['update_norm'])
      & (update_norm <= limits['update_ratio'] * param_norm)
    )
  keep = finite & within
  params, target_params, opt_state = jax.tree.map(
    lambda new, old: jnp.where(keep, new, old),
    (params, target_params, opt_state),
    (
      state.params,
      state.target_params,
      opt_state._replace(inner_state=state.opt_state.inner_state),
    ),
  )
  metrics = {
    'lr': lr,
    'wd': wd,
    'momentum': momentum,
    'grad_norm': grad_norm,
    'update_norm': update_norm,
    'param_norm': param_norm,
    'nonfinite': jnp.logical_not(finite).astype(jnp.int32),
    'diverged': (finite & jnp.logical_not(within)).astype(jnp.int32),
  }
  return params, target_params, opt_state, metrics


def make_train_step(config, encoder, predictor, tx, schedules: Schedules):
  """Returns the pure `train_step(state, batch, rng, limits=None) -> (state, metrics)`; jit it
  outside.

  batch: {'image': [B, H, W, 3], 'ctx_idx': int [B, Kc], 'ctx_valid': bool [B, Kc],
          'tgt_idx': int [n, B, Kt], 'tgt_valid': bool [n, B, Kt]}.
  limits: the divergence guard's bounds (`apply_update`); None = no bounds.
  """
  num_target_layers = config.loss.num_target_layers
  combine = config.loss.multi_layer_target
  lowres = config.loss.lowres
  grid = (config.model.image_size // config.model.patch_size,) * 2
  loss_fn = make_loss_fn(config, encoder, predictor)

  def train_step(state: TrainState, batch, rng, limits=None):
    step = state.step
    stop_rng = stream_key(rng, step, STOP_STREAM)
    feats = target_features(
      encoder, state.target_params, batch['image'], num_target_layers, combine
    )
    targets = gather_targets(feats, batch['tgt_idx'])  # [n, B, Kt, D]
    if lowres != 'none':  # Table 8: also the 2x coarser map at each block's cells
      coarse, coarse_idx, coarse_valid = coarse_targets(feats, batch, grid, lowres)
      targets = (targets, coarse)
      batch = {**batch, 'coarse_idx': coarse_idx, 'coarse_valid': coarse_valid}
    (total, (losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, targets, stop_rng
    )
    params, target_params, opt_state, update = apply_update(
      state, grads, total, tx, schedules, rng, limits
    )
    embed = params['predictor']['predictor_embed']
    metrics = {
      **losses,
      'total_loss': total,
      **update,
      'A_norm': jnp.linalg.norm(embed['kernel']),
      'A_bias_norm': jnp.linalg.norm(embed['bias']),
      'noise_to_pos': stats['noise_to_pos'],
      # Collapse health: the spread of the targets across images (eval/health.py).
      'target_std': jnp.mean(jnp.std(feats, axis=0)),
      'ctx_tokens': jnp.mean(jnp.sum(batch['ctx_valid'], axis=-1).astype(jnp.float32)),
      'tgt_tokens': jnp.mean(jnp.sum(batch['tgt_valid'], axis=-1).astype(jnp.float32)),
    }
    new_state = state.replace(
      step=step + 1, params=params, target_params=target_params, opt_state=opt_state
    )
    return new_state, metrics

  return train_step
