"""Multi-block masks for I-JEPA: one context block minus several target blocks, at fixed shapes.

The sampler reproduces the official I-JEPA `MaskCollator` in distribution (not bit for bit: it
draws from numpy, not torch), vectorised over the batch:

* Per batch, one uniform draw fixes the target block size and a second one the context block
  size. The same draw sets both the scale and the aspect ratio (they are correlated, as in the
  official code); see `block_size`.
* Per image, `num_targets` target blocks are placed uniformly at random (they may overlap), then
  one context block; the context is the context block minus every target block. A context with
  at most `min_keep` tokens is re-placed; after 20 failures the last remaining target is no
  longer subtracted, and so on (the official relaxation).
* Indices are in raster order: `idx = row * w + col`.

Two modes:

* 'official' keeps the official quirks: a block's top-left corner is drawn with an exclusive upper
  bound (`randint(0, h - bh)`), so no block ever touches the last row or column, and at 224/16
  the 13x13 context block always sits in the top-left corner. Truncation keeps the first tokens in
  raster order, as the official truncation to the batch minimum does (it drops bottom-right ones).
* 'corrected' (the default) uses an inclusive bound, lets a block span the whole grid, and
  truncates to a uniformly random subset of the valid tokens, so there is no bottom-right bias.

Fixed shapes. The official collator cuts every mask of a batch to the shortest one in that batch,
so the token count changes from step to step; under jit each new count would recompile the train
step. Here every row has exactly K_ctx context slots and K_tgt slots per target block. An image
with more tokens is truncated (see the modes); one with fewer is padded: padded slots repeat the
row's first valid index (safe to gather) and are marked invalid, and valid slots always come first.
Padding is masked out downstream (`*_valid`).

By default K is the official average, rounded: the mean over batches of the batch-minimum count
at 64 images per device (`official_token_counts`): 53 context / 33 target slots at 224/16, 72 / 44
at 224/14. The step does not see that average, though. The context count is close (a context
block is almost never below K_ctx). Target blocks are not: all target blocks of a batch share one
size T, a batch with T < K_tgt pads every target and one with T > K_tgt truncates them, so the step
sees E[min(T, K_tgt)] valid target tokens per block, a few percent below the official E[T].
`token_statistics` measures both; the run logs them and saves them in plan.json ('mask_tokens').
Raise `mask.num_target_tokens` to the largest block size to keep every target token (more
compute, more padding).

Everything random comes from a numpy Generator seeded by (seed, step): every host of a multi-host
job samples the same global batch and takes its own rows.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MODES = ('official', 'corrected')
# Official `timeout`: placements tried at one relaxation level before a target is dropped.
_RETRIES = 20


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Everything the sampler needs; K counts of -1 must be resolved before `sample_masks`."""

  grid: tuple[int, int]  # (h, w) patch grid
  num_targets: int = 4
  target_scale: tuple[float, float] = (0.15, 0.2)
  target_aspect: tuple[float, float] = (0.75, 1.5)
  context_scale: tuple[float, float] = (0.85, 1.0)
  min_keep: int = 10
  mode: str = 'corrected'  # 'official' | 'corrected'
  num_context_tokens: int = -1  # K_ctx; -1 only before resolution
  num_target_tokens: int = -1  # K_tgt

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'MaskSpec.mode={self.mode!r}: expected one of {MODES}.')
    if len(self.grid) != 2 or min(self.grid) < 1:
      raise ValueError(f'MaskSpec.grid={self.grid!r}: expected two positive ints.')

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


def block_size(
  r: float,
  grid: tuple[int, int],
  scale: tuple[float, float],
  aspect: tuple[float, float],
  mode: str = 'official',
) -> tuple[int, int]:
  """(bh, bw) of a block for the uniform draw r in [0, 1): one r sets both scale and aspect."""
  h, w = grid
  s = scale[0] + r * (scale[1] - scale[0])
  a = aspect[0] + r * (aspect[1] - aspect[0])
  keep = int(h * w * s)
  # Python's round (half to even) on purpose: the official code uses it.
  bh = int(round(math.sqrt(keep * a)))
  bw = int(round(math.sqrt(keep / a)))
  if mode == 'official':
    # With an exclusive bound on the corner, a block as tall as the grid would have no room.
    return min(bh, h - 1), min(bw, w - 1)
  return min(bh, h), min(bw, w)


def _check_block(size: tuple[int, int], min_keep: int, what: str):
  # The official sampler would loop forever here; fail with the key a user can change.
  if size[0] * size[1] <= min_keep:
    raise ValueError(
      f'a {what} block of {size[0]}x{size[1]} tokens cannot exceed config.mask.min_keep='
      f'{min_keep}: lower min_keep or raise the {what} scale.'
    )


def _corners(rng: np.random.Generator, size, grid, mode: str, shape) -> tuple[np.ndarray, ...]:
  """Uniform top-left corners of blocks of `size`: (top, left), each int [*shape]."""
  inclusive = int(mode == 'corrected')
  top = rng.integers(0, grid[0] - size[0] + inclusive, size=shape)
  left = rng.integers(0, grid[1] - size[1] + inclusive, size=shape)
  return top, left


def _boxes(top: np.ndarray, left: np.ndarray, size, grid) -> np.ndarray:
  """Flattened boolean masks of axis-aligned blocks: bool [*top.shape, h*w]."""
  rows, cols = np.arange(grid[0]), np.arange(grid[1])
  in_rows = (rows >= top[..., None]) & (rows < top[..., None] + size[0])  # [..., h]
  in_cols = (cols >= left[..., None]) & (cols < left[..., None] + size[1])  # [..., w]
  box = in_rows[..., :, None] & in_cols[..., None, :]  # [..., h, w]
  return box.reshape(*top.shape, grid[0] * grid[1])


def _sample_blocks(spec: MaskSpec, rng: np.random.Generator, batch_size: int):
  """The batch's target size, target corners (int [n, B] each) and context masks (bool [B, N])."""
  grid, n, mode = spec.grid, spec.num_targets, spec.mode
  # Target size first, then context size: the official order of the two draws.
  r_t, r_c = rng.random(2)
  t_size = block_size(r_t, grid, spec.target_scale, spec.target_aspect, mode)
  c_size = block_size(r_c, grid, spec.context_scale, (1.0, 1.0), mode)
  _check_block(t_size, spec.min_keep, 'target')
  _check_block(c_size, spec.min_keep, 'context')
  t_top, t_left = _corners(rng, t_size, grid, mode, (n, batch_size))
  tgt = _boxes(t_top, t_left, t_size, grid)  # [n, B, N]

  ctx = np.zeros((batch_size, spec.num_patches), bool)  # [B, N]
  level = np.full(batch_size, n)  # how many targets (the first ones) are still subtracted
  fails = np.zeros(batch_size, int)  # failures at the current level
  pending = np.arange(batch_size)
  # Ends: at level 0 nothing is subtracted and the context block alone exceeds min_keep.
  while pending.size:
    box = _boxes(*_corners(rng, c_size, grid, mode, pending.shape), c_size, grid)  # [P, N]
    subtracted = np.arange(n)[:, None] < level[pending]  # [n, P]
    covered = np.any(tgt[:, pending] & subtracted[..., None], axis=0)  # [P, N]
    candidate = box & ~covered
    ok = candidate.sum(-1) > spec.min_keep
    ctx[pending[ok]] = candidate[ok]
    pending = pending[~ok]
    fails[pending] += 1
    relax = pending[fails[pending] == _RETRIES]
    level[relax] = np.maximum(level[relax] - 1, 0)
    fails[relax] = 0
  return t_size, t_top, t_left, ctx


def sample_block_masks(
  spec: MaskSpec, rng: np.random.Generator, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """One batch of untruncated masks as boolean grids (variable token counts per image).

  Returns:
    ctx_mask: bool [B, h*w], the context block minus the target blocks, with > min_keep tokens.
    tgt_masks: bool [n_targets, B, h*w], each exactly one block of the batch's target size.
  """
  t_size, t_top, t_left, ctx = _sample_blocks(spec, rng, batch_size)
  return ctx, _boxes(t_top, t_left, t_size, spec.grid)


def _official_means(
  spec: MaskSpec, batch_size: int, num_batches: int, seed: int
) -> tuple[float, float]:
  """Mean over batches of the batch-minimum context count and of the target block size, as the
  official sampler (spec.mode must be 'official') and its truncation to the batch minimum give."""
  rng = np.random.default_rng(seed)
  ctx_min = np.empty(num_batches)
  tgt_min = np.empty(num_batches)
  for i in range(num_batches):
    t_size, _, _, ctx = _sample_blocks(spec, rng, batch_size)
    ctx_min[i] = ctx.sum(-1).min()
    tgt_min[i] = t_size[0] * t_size[1]  # every target block of a batch has this many tokens
  return float(ctx_min.mean()), float(tgt_min.mean())


def official_token_counts(
  grid: tuple[int, int],
  num_targets: int = 4,
  target_scale: tuple[float, float] = (0.15, 0.2),
  target_aspect: tuple[float, float] = (0.75, 1.5),
  context_scale: tuple[float, float] = (0.85, 1.0),
  min_keep: int = 10,
  batch_size: int = 64,
  num_batches: int = 200,
  seed: int = 0,
) -> tuple[int, int]:
  """(K_ctx, K_tgt) the official code keeps on average after truncating to each batch's minimum.

  Runs the official-mode sampler on `num_batches` batches of `batch_size` (the per-device batch
  of the official recipe) and rounds the mean over batches of the batch-minimum counts.
  """
  spec = MaskSpec(
    grid=tuple(grid),
    num_targets=num_targets,
    target_scale=tuple(target_scale),
    target_aspect=tuple(target_aspect),
    context_scale=tuple(context_scale),
    min_keep=min_keep,
    mode='official',
  )
  ctx, tgt = _official_means(spec, batch_size, num_batches, seed)
  return int(round(ctx)), int(round(tgt))


def token_statistics(
  spec: MaskSpec, batch_size: int = 64, num_batches: int = 200, seed: int = 0
) -> dict[str, float | None]:
  """What the step sees against what the official code trains on, per image (plan.json, log).

  Returns the slots (K_ctx, K_tgt), the mean number of valid tokens in them under `spec`
  (padding excluded: a target block smaller than K_tgt pads, a larger one is truncated, so the
  valid mean is E[min(T, K_tgt)], below E[T]), and the official means (`_official_means`; None
  on a grid too small for the official sampler).
  """
  ctx_valid, tgt_valid = [], []
  for step in range(num_batches):
    m = sample_masks(spec, seed, step, batch_size)
    ctx_valid.append(m['ctx_valid'].sum(-1).mean())
    tgt_valid.append(m['tgt_valid'].sum(-1).mean())
  try:
    official = dataclasses.replace(spec, mode='official')
    off_ctx, off_tgt = _official_means(official, batch_size, num_batches, seed)
  except ValueError:  # a grid too small for the official sampler's blocks: no official figure
    off_ctx = off_tgt = None
  return {
    'context_slots': spec.num_context_tokens,
    'context_valid': float(np.mean(ctx_valid)),
    'official_context': off_ctx,
    'target_slots': spec.num_target_tokens,
    'target_valid': float(np.mean(tgt_valid)),
    'official_target': off_tgt,
  }


def spec_from_config(config) -> MaskSpec:
  """The MaskSpec of `config.mask` at `config.model`'s patch grid, with K counts resolved."""
  m, k = config.model, config.mask
  side = m.image_size // m.patch_size
  params = dict(
    grid=(side, side),
    num_targets=int(k.num_targets),
    target_scale=tuple(float(v) for v in k.target_scale),
    target_aspect=tuple(float(v) for v in k.target_aspect),
    context_scale=tuple(float(v) for v in k.context_scale),
    min_keep=int(k.min_keep),
  )
  k_ctx, k_tgt = int(k.num_context_tokens), int(k.num_target_tokens)
  if k_ctx == -1 or k_tgt == -1:
    auto_ctx, auto_tgt = official_token_counts(**params)
    k_ctx = auto_ctx if k_ctx == -1 else k_ctx
    k_tgt = auto_tgt if k_tgt == -1 else k_tgt
  return MaskSpec(**params, mode=k.mode, num_context_tokens=k_ctx, num_target_tokens=k_tgt)


def _random_subset(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """Keeps a uniformly random k of each row's True entries (all of them if there are fewer)."""
  priority = np.where(mask, rng.random(mask.shape), 2.0)  # invalid entries sort last
  kth = np.partition(priority, k - 1, axis=-1)[..., k - 1 : k]  # [..., 1]
  return mask & (priority <= kth)


def _to_slots(mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The first k True positions of each row in raster order, padded: (int32 [B, k], bool [B, k])."""
  # A stable sort of ~mask lists True positions first, each group in raster order.
  order = np.argsort(~mask, axis=-1, kind='stable')[:, :k]  # [B, k]
  valid = np.arange(k) < mask.sum(-1, keepdims=True)  # [B, k]
  idx = np.where(valid, order, order[:, :1])
  return idx.astype(np.int32), valid


def _target_slots(
  spec: MaskSpec, t_size, t_top, t_left, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-size slots of the target blocks, straight from their corners: int32/bool [n, B, k]."""
  h, w = spec.grid
  offsets = (np.arange(t_size[0])[:, None] * w + np.arange(t_size[1])).ravel()  # [T], ascending
  tokens = (t_top * w + t_left)[..., None] + offsets  # [n, B, T], raster order
  t = offsets.size
  if t > k and spec.mode == 'corrected':
    # A uniform k of the T tokens; sorting the chosen offsets keeps raster order.
    pick = np.sort(np.argsort(rng.random(tokens.shape), axis=-1)[..., :k], axis=-1)
    tokens = np.take_along_axis(tokens, pick, axis=-1)
  elif t > k:
    tokens = tokens[..., :k]  # official: the first k in raster order (the block's bottom rows go)
  valid = np.broadcast_to(np.arange(k) < t, tokens.shape[:-1] + (k,))
  if t < k:
    pad = np.broadcast_to(tokens[..., :1], tokens.shape[:-1] + (k - t,))
    tokens = np.concatenate([tokens, pad], axis=-1)
  return tokens.astype(np.int32), valid


def sample_masks(
  spec: MaskSpec,
  seed: int,
  step: int,
  batch_size: int,
  start: int = 0,
  count: int | None = None,
) -> dict[str, np.ndarray]:
  """Fixed-shape masks for rows [start, start + count) of the global batch of step `step`.

  The whole global batch of `batch_size` images is drawn from (seed, step) alone, so hosts that
  each take their own rows agree on the batch.

  Returns:
    ctx_idx: int32 [B, K_ctx], context token indices, raster order within the valid prefix.
    ctx_valid: bool [B, K_ctx], False on padded slots (which repeat the row's first index).
    tgt_idx: int32 [n_targets, B, K_tgt], target token indices, likewise.
    tgt_valid: bool [n_targets, B, K_tgt].
  where B = count (batch_size - start when count is None).
  """
  k_ctx, k_tgt = spec.num_context_tokens, spec.num_target_tokens
  n = spec.num_patches
  if not (0 < k_ctx <= n and 0 < k_tgt <= n):
    raise ValueError(
      f'token counts (K_ctx={k_ctx}, K_tgt={k_tgt}) must be in [1, {n}]: resolve -1 with '
      'spec_from_config or official_token_counts.'
    )
  stop = batch_size if count is None else start + count
  if not 0 <= start <= stop <= batch_size:
    raise ValueError(f'rows [{start}, {stop}) are not within the batch of {batch_size}.')

  rng = np.random.default_rng([seed, step])
  t_size, t_top, t_left, ctx = _sample_blocks(spec, rng, batch_size)
  # Truncation draws are made for the whole batch before slicing, so every host agrees.
  if spec.mode == 'corrected':
    ctx = _random_subset(ctx, k_ctx, rng)
  tgt_idx, tgt_valid = _target_slots(spec, t_size, t_top, t_left, k_tgt, rng)
  ctx_idx, ctx_valid = _to_slots(ctx[start:stop], k_ctx)
  return {
    'ctx_idx': ctx_idx,
    'ctx_valid': ctx_valid,
    'tgt_idx': np.ascontiguousarray(tgt_idx[:, start:stop]),
    'tgt_valid': np.ascontiguousarray(tgt_valid[:, start:stop]),
  }
