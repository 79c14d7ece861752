"""Where each of our params sits in an official I-JEPA / StoP PyTorch state dict.

The official modules (I-JEPA `vision_transformer.py`, the StoP predictor; rewritten in
`reference/official_torch.py`) name and shape their tensors their own way: Conv2d and Linear
weights are transposed against ours, blocks are numbered keys (`blocks.3.attn.qkv.weight`) where
ours may be one scan-stacked array, and the sin-cos tables are buffers in the state dict.
`plan(part, config)` gives, for each of our params, its official key(s) and shape; `to_ours`
turns one official tensor into our layout. `official_shapes` lists every key an official state
dict of a part has; `describe_state_dict` / `describe_config` say what a checkpoint and a config
look like in those terms, for mismatch messages. Pure: no torch, no file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from stop_jax import config as config_lib
from stop_jax import models

# Our module names whose official counterpart is named differently.
_MODULE_NAMES = {'patch_embed': 'patch_embed.proj', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2'}
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
BLOCK_KEY = re.compile(r'^(\w*blocks)\.(\d+)\.(.+)$')


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One of our params and the official tensor(s) it comes from."""

  path: tuple[str, ...]  # our param path
  torch_keys: tuple[str, ...]  # one per block for scan-stacked params, else one
  torch_shape: tuple[int, ...]  # the shape of each official tensor
  stacked: bool  # our param has a leading depth axis (nn.scan)


def to_ours(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
  """One official tensor in our layout."""
  if path[-1] == 'kernel' and w.ndim == 4:
    return w.transpose(2, 3, 1, 0)  # Conv2d [D, C, p, p] -> nn.Conv [p, p, C, D]
  if path[-1] == 'kernel':
    return w.T  # Linear [out, in] -> Dense [in, out]
  if path[-1] == 'mask_token':
    return w.reshape(1, 1, 1, -1)  # [1, 1, d_p] -> [1, 1, 1, d_p] (broadcast over n, B, Kt)
  if path[-1] == 'predictor_pos_embed':
    return w.reshape(w.shape[-2:])  # [1, N, d_p] -> [N, d_p]
  return w


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Inverse of `to_ours` on shapes: the official shape of one of our (per-block) params."""
  if path[-1] == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == 'kernel':
    return tuple(reversed(shape))
  if path[-1] == 'mask_token':
    return (1, 1, shape[-1])
  if path[-1] == 'predictor_pos_embed':
    return (1, *shape)
  return tuple(shape)


def _abstract_params(part: str, config: ml_collections.ConfigDict) -> dict:
  """Shapes of our params for `part`, without allocating them."""
  if part == 'predictor':
    module = models.build_predictor(config)
    width = config_lib.vit_shape(config.model)[0]
    args = (jnp.zeros((1, 1, width)), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, 1), jnp.int32))
    rngs = {'params': jax.random.key(0), 'stop': jax.random.key(1)}
  else:
    module = models.build_encoder(config)
    size = config.model.image_size
    args = (jnp.zeros((1, size, size, 3)),)
    rngs = jax.random.key(0)
  variables = jax.eval_shape(lambda: module.init(rngs, *args))
  return nn.meta.unbox(variables['params'])


def plan(part: str, config: ml_collections.ConfigDict) -> list[Leaf]:
  """The official key(s) and shape of every leaf of our param tree for `part`."""
  leaves = []
  for path, x in traverse_util.flatten_dict(_abstract_params(part, config)).items():
    *mods, leaf = path
    names, stacked = [], False
    for m in mods:
      if m == 'layers':  # nn.scan stack: one official block per index of the leading axis
        stacked = True
        names.append('{i}')
      elif m.startswith('layers_'):  # unrolled BlockStack
        names.append(m[len('layers_') :])
      else:
        names.append(_MODULE_NAMES.get(m, m))
    key = '.'.join([*names, _LEAF_NAMES.get(leaf, leaf)] if mods else [leaf])
    shape = tuple(x.shape[1:] if stacked else x.shape)
    keys = tuple(key.format(i=i) for i in range(x.shape[0])) if stacked else (key,)
    leaves.append(Leaf(path, keys, _torch_shape(path, shape), stacked))
  return leaves


def official_shapes(part: str, config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """Every key and shape an official state dict of `part` has for this config.

  The fixed sin-cos buffers (`pos_embed`, and `predictor_pos_embed` unless learned) are included;
  a StoP checkpoint's unused `mask_token` is not, in the modes that drop it.
  """
  shapes = {k: leaf.torch_shape for leaf in plan(part, config) for k in leaf.torch_keys}
  n = (config.model.image_size // config.model.patch_size) ** 2
  if part != 'predictor':
    shapes['pos_embed'] = (1, n, config_lib.vit_shape(config.model)[0])
  elif 'predictor_pos_embed' not in shapes:
    shapes['predictor_pos_embed'] = (1, n, config.predictor.width)
  return shapes


def describe_state_dict(part: str, sd: Mapping[str, np.ndarray]) -> str:
  """What a checkpoint part looks like, read off its shapes (for mismatch messages)."""
  depth = 1 + max((int(m[2]) for k in sd if (m := BLOCK_KEY.match(k))), default=-1)
  if part == 'predictor':
    if 'predictor_embed.weight' not in sd:
      return 'no predictor_embed.weight'
    d_p, d_e = sd['predictor_embed.weight'].shape
    return f'predictor width {d_p}, depth {depth}, encoder width {d_e}'
  if 'patch_embed.proj.weight' not in sd:
    return 'no patch_embed.proj.weight'
  width, _, patch, _ = sd['patch_embed.proj.weight'].shape
  mlp = sd['blocks.0.mlp.fc1.weight'].shape[0] if 'blocks.0.mlp.fc1.weight' in sd else -1
  variant = [n for n, (w, d, _, _) in config_lib.VIT_VARIANTS.items() if (w, d) == (width, depth)]
  known = f' (variant {variant[0]!r})' if variant else ''
  return f'width {width}, depth {depth}, patch {patch}, mlp {mlp}{known}'


def describe_config(part: str, config: ml_collections.ConfigDict) -> str:
  """What the config says a checkpoint part looks like, in the terms of `describe_state_dict`."""
  width, depth, _, ratio = config_lib.vit_shape(config.model)
  if part == 'predictor':
    p = config.predictor
    return (
      f'predictor width {p.width}, depth {p.depth}, encoder width {width},'
      f' stop.mode={config.stop.mode!r}'
    )
  return (
    f'width {width}, depth {depth}, patch {config.model.patch_size}, mlp {int(width * ratio)}'
    f' (model.variant={config.model.variant!r})'
  )
