"""Table 8's low-resolution targets: besides each target block's tokens, predict the target
feature map downscaled by 2 at the coarse cells the block covers (config `loss.lowres`).

The paper (Sec. 4.3, Table 8) trains "models to predict features in both the original scale and a
downscaled version by a factor of 2, using bilinear resizing and max pooling", and reports them
next to sin-cos (I-JEPA) and StoP; no code was published. Our reading, every choice visible here:
- the coarse map is the layer-normed target map [B, h, w, D] downscaled to [B, h/2, w/2, D] by a
  2x2 max pool ('max') or a bilinear resize without antialiasing ('bilinear': torch's
  `F.interpolate(scale_factor=0.5, mode='bilinear')`, which at exactly half size averages each
  2x2 cell), then layer-normed again so its loss has the full-resolution loss's scale;
- a block's coarse targets are the distinct coarse cells its valid tokens fall in (a block of
  Kt tokens covers at most Kt cells: the coarse slots have the fine slots' static shape, with
  repeats and padding marked invalid);
- the predictor gets one masked token per coarse cell, at the coarse grid's sin-cos position plus
  a learned level token (`Predictor`, `coarse_idx`), in the same sequence as the block's tokens;
- the loss adds `loss.lowres_weight` x the same regression loss on the coarse cells.
The variants `lowres_max` / `lowres_bilinear` of configs/ablation.py pair this with sin-cos
positions (stop.mode='off'), the alternative to StoP that Table 8 compares.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def downscale(feats, grid: tuple[int, int], method: str):
  """The target map at half resolution (the step layer-norms it again).

  Args:
    feats: float32 [B, h*w, D] layer-normed target features in raster order.
    grid: (h, w), both even.
    method: 'max' (2x2 max pool) or 'bilinear' (half-size bilinear resize, no antialiasing).
  Returns:
    float32 [B, h/2 * w/2, D], raster order of the coarse grid.
  """
  b, _, d = feats.shape
  h, w = grid
  x = feats.reshape(b, h, w, d)
  if method == 'max':
    x = jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, d), axis=(2, 4))
  elif method == 'bilinear':
    x = jax.image.resize(x, (b, h // 2, w // 2, d), 'bilinear', antialias=False)
  else:
    raise ValueError(f"loss.lowres={method!r} is not allowed here: 'max' or 'bilinear'.")
  return x.reshape(b, (h // 2) * (w // 2), d)


def coarse_cells(tgt_idx, tgt_valid, grid: tuple[int, int]):
  """The distinct coarse cells of each target block.

  Args:
    tgt_idx: int [n, B, Kt] raster indices of the blocks' tokens on the (h, w) grid.
    tgt_valid: bool [n, B, Kt]; False slots are padding.
    grid: (h, w), both even.
  Returns:
    coarse_idx int [n, B, Kt] raster indices on the (h/2, w/2) grid, sorted; coarse_valid bool
    [n, B, Kt]: True once per distinct cell of a valid token (repeats and padding: False, with
    index 0, so gathers stay in range).
  """
  _, w = grid
  cell = (tgt_idx // w // 2) * (w // 2) + (tgt_idx % w) // 2
  beyond = (grid[0] // 2) * (w // 2)  # sorts after every real cell
  cell = jnp.sort(jnp.where(tgt_valid, cell, beyond), axis=-1)
  first = jnp.concatenate(
    [jnp.ones_like(cell[..., :1], bool), cell[..., 1:] != cell[..., :-1]], axis=-1
  )
  valid = first & (cell < beyond)
  return jnp.where(valid, cell, 0).astype(tgt_idx.dtype), valid
