"""The ViT encoder of I-JEPA: context encoder, and (as an EMA copy) target encoder."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

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

  @nn.compact
  def __call__(self, images, keep_idx=None, keep_valid=None, return_blocks: bool = False):
    """Encodes the kept tokens of a batch of images.

    Args:
      images: [B, H, W, 3], H and W divisible by patch_size.
      keep_idx: optional int [B, K] raster indices of the tokens to keep (context tokens);
        None keeps all N tokens.
      keep_valid: optional bool [B, K]; False marks padding that no token attends to.
      return_blocks: also return every block's output after the final LayerNorm.
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
    x = x + jnp.asarray(sincos_2d(hgt // p, wid // p, self.width), self.dtype)
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
      name='blocks',
    )(x, keep_valid)
    norm = layer_norm(self.dtype, 'norm')
    if return_blocks:
      return norm(x), norm(outs)
    return norm(x)
