"""Model definitions and the one place that turns a config into modules."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from stop_jax import config as config_lib
from stop_jax.models.layers import resolve_attention
from stop_jax.models.predictor import Predictor
from stop_jax.models.vit import VisionTransformer

__all__ = ['Predictor', 'VisionTransformer', 'build_encoder', 'build_predictor']


def _dtype(config):
  return jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32


def build_encoder(config: ml_collections.ConfigDict) -> VisionTransformer:
  width, depth, heads, ratio = config_lib.vit_shape(config.model)
  return VisionTransformer(
    patch_size=config.model.patch_size,
    width=width,
    depth=depth,
    num_heads=heads,
    # The official code uses int(dim * mlp_ratio): 6144 for ViT-G (48/11).
    mlp_dim=int(width * ratio),
    dtype=_dtype(config),
    gelu=config.model.gelu,
    remat=config.model.remat,
    scan_blocks=config.model.scan_blocks,
    attention=resolve_attention(config.model.attention, _dtype(config)),
  )


def build_predictor(config: ml_collections.ConfigDict) -> Predictor:
  width, _, heads, _ = config_lib.vit_shape(config.model)
  grid = config.model.image_size // config.model.patch_size
  p = config.predictor
  return Predictor(
    grid=(grid, grid),
    encoder_width=width,
    width=p.width,
    depth=p.depth,
    num_heads=p.num_heads if p.num_heads > 0 else heads,
    mlp_dim=4 * p.width,  # The official predictor keeps mlp_ratio 4 for every encoder.
    stop_mode=config.stop.mode,
    sigma=float(config.stop.sigma),
    pos_embed=p.pos_embed,
    dtype=_dtype(config),
    gelu=config.model.gelu,
    remat=config.model.remat,
    scan_blocks=config.model.scan_blocks,
    attention=resolve_attention(config.model.attention, _dtype(config)),
  )
