"""The ViT encoder of I-JEPA: context encoder, and (as an EMA copy) target encoder."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from stop_jax.models.layers import ZEROS, BlockStack, init, layer_norm, sincos_2d


class VisionTransformer(nn.Module):
  """Patch embedding + fixed 2D sin-cos positions + pre-norm blocks + final LayerNorm.

  No CLS token and no head, as in I-JEPA. Module names follow the official checkpoint keys
  (`patch_embed`, `blocks`, `norm`) so conversion is a renaming, not a puzzle.
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  gelu: str = 'exact'
  remat: str = 'none'  # none | block | dots
  scan_blocks: bool = True
  attention: str = 'einsum'  # layers.ATTENTION_IMPLS
  # The token grid (rows, cols) the position table was trained at. None (the default): the fixed
  # sin-cos table is computed at the input's own grid. Set, and the input's grid differs: that
  # table is bicubically resized to the input's grid, as the official `interpolate_pos_encoding`
  # does (`position_table`).
  pos_embed_grid: tuple[int, int] | None = None
  drop_path: float = 0.0  # Stochastic depth (fine-tuning), active only with train=True.

  @nn.compact
  def __call__(
    self, images, keep_idx=None, keep_valid=None, return_blocks: bool = False, train=False
  ):
    """Encodes the kept tokens of a batch of images.

    Args:
      images: [B, H, W, 3], H and W divisible by patch_size.
      keep_idx: optional int [B, K] raster indices of the tokens to keep (context tokens);
        None keeps all N tokens.
      keep_valid: optional bool [B, K]; False marks padding that no token attends to.
      return_blocks: also return every block's output after the final LayerNorm.
      train: apply drop_path (needs a 'dropout' RNG); False = the deterministic encoder.
    Returns:
      [B, K, D] (K = N without keep_idx), and with return_blocks also [depth, B, K, D].
    """
    b, hgt, wid, _ = images.shape
    p = self.patch_size
    if hgt % p or wid % p:
      raise ValueError(f'image size {hgt}x{wid} is not divisible by patch_size={p}.')
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding='VALID',
      kernel_init=init((None, None, None, 'embed')),
      bias_init=init(('embed',), ZEROS),
      dtype=self.dtype,
      name='patch_embed',
    )(images.astype(self.dtype))  # [B, h, w, D]
    x = x.reshape(b, -1, self.width)  # [B, N, D] raster order
    table = position_table(hgt // p, wid // p, self.width, self.pos_embed_grid)
    x = x + jnp.asarray(table, self.dtype)
    if keep_idx is not None:
      x = jnp.take_along_axis(x, keep_idx[..., None], axis=1)  # [B, K, D]
    x, outs = BlockStack(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dtype=self.dtype,
      gelu=self.gelu,
      remat=self.remat,
      scan=self.scan_blocks,
      attention=self.attention,
      collect=return_blocks,
      drop_path=self.drop_path if train else 0.0,
      name='blocks',
    )(x, keep_valid)
    norm = layer_norm(self.dtype, 'norm')
    if return_blocks:
      return norm(x), norm(outs)
    return norm(x)


def position_table(h: int, w: int, dim: int, trained_grid: tuple[int, int] | None = None):
  """The [h * w, dim] position table of an h x w token grid (raster order), float32 numpy.

  trained_grid None or (h, w): the fixed sin-cos table at (h, w). Otherwise the sin-cos table at
  trained_grid resized to (h, w) the way DINO's `interpolate_pos_encoding` (which DINO's video
  segmentation evaluation runs) resizes its stored table: torch `F.interpolate(mode='bicubic')`
  with `scale_factor = (h + 0.1) / rows` (and the same for columns), i.e. the output is h x w but
  source coordinates follow the scale factor, not h / rows (the 0.1 guards the floor of the
  output size against float error).
  """
  if trained_grid is None or tuple(trained_grid) == (h, w):
    return sincos_2d(h, w, dim)
  rows, cols = trained_grid
  table = sincos_2d(rows, cols, dim).reshape(rows, cols, dim).astype(np.float64)
  mh = bicubic_matrix(rows, h, (h + 0.1) / rows)  # [h, rows]
  mw = bicubic_matrix(cols, w, (w + 0.1) / cols)  # [w, cols]
  out = np.einsum('ar,rcd,bc->abd', mh, table, mw)
  return out.reshape(h * w, dim).astype(np.float32)


def bicubic_matrix(in_size: int, out_size: int, scale: float, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] weights of torch's 1-D bicubic resize (align_corners=False).

  Output pixel i samples source coordinate (i + 0.5) / scale - 0.5 with the cubic convolution
  kernel of parameter a (torch: -0.75) on the 4 nearest source pixels, indices clamped to the
  border (torch's `upsample_bicubic2d`). Rows sum to 1.
  """
  src = (np.arange(out_size) + 0.5) / scale - 0.5
  base = np.floor(src)
  t = src - base
  # Distances of the 4 taps (base - 1 .. base + 2) from the sample point.
  dist = np.stack([t + 1, t, 1 - t, 2 - t], axis=1)  # [out, 4]
  near = ((a + 2) * dist - (a + 3)) * dist * dist + 1  # |x| <= 1
  far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a  # 1 < |x| < 2
  weights = np.where(dist <= 1, near, far)
  taps = np.clip(base[:, None].astype(int) + np.arange(-1, 3), 0, in_size - 1)
  m = np.zeros((out_size, in_size))
  np.add.at(m, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
  return m
