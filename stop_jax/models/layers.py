"""Pieces shared by the encoder and the predictor: sin-cos positions, attention, blocks."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stop_jax.runtime.sharding import ACT_HIDDEN, ACT_TOKENS, constrain

# The official code calls `trunc_normal_(std=0.02)` with its default bounds a=-2, b=2, which are
# absolute values, i.e. +-100 std: effectively an untruncated N(0, 0.02^2). JAX's bounds are in
# units of std, so we widen them to match rather than get the 0.88x std of a +-2 std truncation.
INIT = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def init(names: tuple[str | None, ...], base=INIT):
  """`base` initialiser whose params carry logical axis names (mapped by sharding.RULES)."""
  return nn.with_logical_partitioning(base, names)


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's contraction ([..., D_in] x [D_in, D_out]); on XLA:CPU over a [M, D_in] view.

  On [B, N, D_in] inputs the kernel's gradient contracts two axes, batch and tokens, and
  XLA:CPU copies the [B, N, D_out] cotangent into a transposed layout before each such dot. On
  the flat view it is one contraction that oneDNN takes as it is, and the CPU step is faster
  (bench/NOTES.md). GPU and TPU keep the N-d dot: the reshape was not measured there.
  """
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense_shaped = (
    rhs.ndim == 2
    and tuple(lhs_contract) == (lhs.ndim - 1,)
    and tuple(rhs_contract) == (0,)
    and not (tuple(lhs_batch) or tuple(rhs_batch))
  )
  if lhs.ndim <= 2 or not dense_shaped or jax.default_backend() != 'cpu':
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kw)
  y = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), **kw)
  return y.reshape(*lhs.shape[:-1], rhs.shape[-1])  # [M, D_out] -> [..., D_out]


def dense(features: int, names: tuple[str | None, str | None], dtype, name: str, **kw):
  """nn.Dense with the official init, logical names (in, out) on kernel and bias, and
  `flat_dot_general`."""
  bias = {} if kw.get('use_bias', True) is False else {'bias_init': init((names[1],), ZEROS)}
  return nn.Dense(
    features,
    kernel_init=init(names),
    dtype=dtype,
    name=name,
    dot_general=flat_dot_general,
    **bias,
    **kw,
  )


def layer_norm(dtype, name: str, axis_name: str | None = 'embed'):
  """LayerNorm with eps 1e-6 (the official ViT's) and logically named scale / bias."""
  return nn.LayerNorm(
    epsilon=1e-6,
    dtype=dtype,
    scale_init=init((axis_name,), nn.initializers.ones),
    bias_init=init((axis_name,), ZEROS),
    name=name,
  )


ZEROS = nn.initializers.zeros

# Attention kernels (config model.attention): 'einsum' is ours (float32 logits, any mask; the
# fastest on XLA:CPU); 'xla' is jax.nn.dot_product_attention's XLA path; 'cudnn' its fused
# flash-attention kernel on NVIDIA GPUs (bf16/fp16 only; padding must be a suffix of each row).
ATTENTION_IMPLS = ('einsum', 'xla', 'cudnn')


def resolve_attention(kind: str, dtype) -> str:
  """'auto' -> cudnn on a GPU backend with 16-bit compute, else einsum."""
  if kind != 'auto':
    return kind
  gpu = jax.default_backend() == 'gpu'
  return 'cudnn' if gpu and jnp.dtype(dtype).itemsize == 2 else 'einsum'


def prefix_order(key_mask):
  """Permutation putting each row's valid tokens first (stable). bool [B, N] -> int [B, N]."""
  return jnp.argsort(jnp.logical_not(key_mask), axis=-1, stable=True)


# Remat policies by config name: 'block' recomputes everything in a block in the backward pass,
# 'dots' keeps the Dense outputs (matmuls without batch dims) and recomputes attention and
# elementwise ops, the usual memory / FLOPs middle ground for large ViTs.
REMAT_POLICIES = {
  'block': None,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[sin(pos * omega), cos(pos * omega)] with omega_k = 1 / 10000^(k / (dim/2)).

  Args:
    dim: even embedding width.
    pos: positions, any shape; flattened.
  Returns:
    float32 [pos.size, dim].
  """
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
  """The official fixed 2D sin-cos table, rows in raster order.

  The first half of the channels encodes the column (x) and the second half the row (y):
  the official code builds `meshgrid(w_coords, h_coords)` and encodes grid[0] first. Swapping
  the halves silently breaks imported checkpoints, so tests pin hand-computed entries.

  Returns:
    float32 [h * w, dim].
  """
  if dim % 4:
    raise ValueError(f'sin-cos width must be divisible by 4, got {dim}.')
  cols, rows = np.meshgrid(np.arange(w), np.arange(h))  # each [h, w]
  return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def _gelu_erf(x):
  # PyTorch's nn.GELU() formula (the official ViTs). jax.nn.gelu(approximate=False) is the same
  # function written with erfc: more accurate far in the negative tail (|error| there is ~1e-6
  # either way) but its backward costs more: the CPU step was slower with it (bench/NOTES.md).
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2.0), x.dtype)))


def gelu_fn(kind: str):
  # Flax/JAX default to the tanh approximation; the official ViTs use the exact erf form.
  if kind == 'exact':
    return _gelu_erf
  if kind == 'tanh':
    return functools.partial(jax.nn.gelu, approximate=True)
  raise ValueError(f"gelu must be 'exact' or 'tanh', got {kind!r}.")


class Attention(nn.Module):
  """Multi-head self-attention with a qkv Dense laid out as the official `attn.qkv`."""

  num_heads: int
  dtype: Any = jnp.float32
  impl: str = 'einsum'  # einsum | xla | cudnn, see ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x, key_mask=None):
    """x: [B, N, D]; key_mask: optional bool [B, N], False = padding never attended to.

    With impl='cudnn' the valid keys of each row must come first (a prefix mask): the fused
    kernel takes sequence lengths, not arbitrary masks. The encoder's context slots are laid out
    that way; the predictor reorders its tokens (`prefix_order`).
    """
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = dense(3 * d, ('embed', 'heads'), self.dtype, 'qkv')(x)  # [B, N, 3D]: q | k | v
    # Split the flat feature axis: in the backward that is one concatenate, where indexing a
    # [B, N, 3, H, hd] view pads each cotangent to full size (measured: a slower CPU step).
    q, k, v = (t.reshape(b, n, self.num_heads, hd) for t in jnp.split(qkv, 3, axis=-1))
    if self.impl != 'einsum':
      lengths = None if key_mask is None else jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
      out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if (key_mask is None or self.impl == 'cudnn') else key_mask[:, None, None, :],
        key_value_seq_lengths=lengths if self.impl == 'cudnn' else None,
        implementation=self.impl,
      ).reshape(b, n, d)
      out = constrain(out, ('batch', 'length', 'act_heads'))
      return dense(d, ('heads', 'embed'), self.dtype, 'proj')(out)
    # float32 logits even under bf16 compute: rounding them first would blur the softmax.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * (hd**-0.5), k, preferred_element_type=jnp.float32)
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, d)
    out = constrain(out, ('batch', 'length', 'act_heads'))
    return dense(d, ('heads', 'embed'), self.dtype, 'proj')(out)


def drop_path(x, rate, rng, deterministic: bool):
  """Stochastic depth (timm's `drop_path`): zeroes a residual branch for whole examples.

  Each example's branch is kept with probability 1 - rate and then divided by 1 - rate, so
  its expected value is unchanged. Identity when deterministic (evaluation) or rate is 0.

  Args:
    x: the branch output [B, ...].
    rate: drop probability in [0, 1) (a Python float or a traced scalar).
    rng: PRNG key of this call.
    deterministic: True = no drop.
  Returns:
    [B, ...], x's dtype.
  """
  if deterministic or (isinstance(rate, int | float) and rate == 0):
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(rng, keep, shape)
  return x * (mask / keep).astype(x.dtype)


def drop_path_rate(max_rate: float, layer, depth: int):
  """timm's rule: rates rise linearly from 0 (first block) to max_rate (last block)."""
  return max_rate * layer / max(depth - 1, 1)


class Block(nn.Module):
  """Pre-norm transformer block, shaped as an `nn.scan` body: returns (x, x or None)."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  gelu: str = 'exact'
  collect: bool = False  # Also emit the block output (K-average targets, last-4 features).
  attention: str = 'einsum'
  # Stochastic depth (fine-tuning only): the rate of the last block; block i of `depth` drops
  # its branches with rate drop_path * i / (depth - 1), drawn from the 'dropout' RNG stream.
  # 0 (pretraining) leaves the computation exactly as without it.
  drop_path: float = 0.0
  depth: int = 1

  @nn.compact
  def __call__(self, x, key_mask=None, layer=None):
    """x: [B, N, D]; layer: this block's index (an int, or a scanned int32 scalar)."""
    d = x.shape[-1]
    on = self.drop_path > 0
    rate = drop_path_rate(self.drop_path, layer, self.depth) if on else 0.0

    def branch(y):
      return drop_path(y, rate, self.make_rng('dropout'), False) if on else y

    x = constrain(x, ACT_TOKENS)
    y = layer_norm(self.dtype, 'norm1')(x)
    x = x + branch(Attention(self.num_heads, self.dtype, self.attention, name='attn')(y, key_mask))
    y = layer_norm(self.dtype, 'norm2')(x)
    y = constrain(dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, 'fc1')(y), ACT_HIDDEN)
    y = dense(d, ('mlp', 'embed'), self.dtype, 'fc2')(gelu_fn(self.gelu)(y))
    x = constrain(x + branch(y), ACT_TOKENS)
    return x, (x if self.collect else None)


class BlockStack(nn.Module):
  """`depth` Blocks, scanned (params stacked on a leading axis) or unrolled.

  Scanning keeps compile time flat in depth (ViT-H/G); unrolled keeps one param subtree per
  block. Both compute the same function.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  gelu: str = 'exact'
  remat: str = 'none'  # none | block | dots (REMAT_POLICIES)
  scan: bool = True
  collect: bool = False
  attention: str = 'einsum'
  drop_path: float = 0.0  # Stochastic depth of the last block (Block.drop_path); 0 = off.

  @nn.compact
  def __call__(self, x, key_mask=None):
    """x: [B, N, D] -> ([B, N, D], per-block outputs [depth, B, N, D] or None).

    With drop_path > 0 the caller supplies a 'dropout' RNG stream (one key per block).
    """
    if self.remat == 'none':
      block_cls = Block
    elif self.remat in REMAT_POLICIES:
      # Under scan, XLA cannot CSE across iterations, so the CSE barrier is only needed unrolled.
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    else:
      raise ValueError(
        f"remat must be 'none' or one of {sorted(REMAT_POLICIES)}, got {self.remat!r}."
      )
    kw = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dtype=self.dtype,
      gelu=self.gelu,
      collect=self.collect,
      attention=self.attention,
    )
    if self.drop_path > 0:
      kw.update(drop_path=self.drop_path, depth=self.depth)
    if self.scan:
      # With drop path each block also gets its index (a scanned input) and its own key.
      extra = self.drop_path > 0
      stack = nn.scan(
        block_cls,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True} if extra else {'params': True},
        in_axes=(nn.broadcast, 0) if extra else nn.broadcast,
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: 'layers'},  # Stacked params: [layers, ...].
      )
      if extra:
        return stack(**kw, name='layers')(x, key_mask, jnp.arange(self.depth))
      return stack(**kw, name='layers')(x, key_mask)
    outs = []
    for i in range(self.depth):
      args = (x, key_mask, i) if self.drop_path > 0 else (x, key_mask)
      x, y = block_cls(**kw, name=f'layers_{i}')(*args)
      outs.append(y)
    return x, (jnp.stack(outs) if self.collect else None)
