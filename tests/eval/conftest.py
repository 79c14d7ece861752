"""Shared by the eval tests: a small random-init ViT (width 32, depth 5) and random images."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax.models.vit import VisionTransformer

WIDTH, DEPTH = 32, 5


def small_encoder(depth: int = DEPTH) -> VisionTransformer:
  return VisionTransformer(
    patch_size=4, width=WIDTH, depth=depth, num_heads=4, mlp_dim=64, scan_blocks=False
  )


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
  """float32 [n, size, size, 3], standard normal."""
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def init_params(encoder: VisionTransformer, seed: int = 0) -> dict:
  """The encoder's params from key `seed` (plain arrays); jitted, as op-by-op init is slow."""
  variables = jax.jit(encoder.init)(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))
  return nn.meta.unbox(variables['params'])


@pytest.fixture(scope='session')
def encoder_and_params():
  """small_encoder() and its params from key 0."""
  enc = small_encoder()
  return enc, init_params(enc)
