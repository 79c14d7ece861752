"""The I-JEPA predictor with stochastic positional embeddings (StoP).

`Predictor.__call__` runs three steps: positions, StoP tokens, the transformer. The StoP block
(marked "StoP") is `_stop_tokens` and `_masked_tokens`. The tied matrix A is the predictor's input
Dense `predictor_embed` (d_e -> d_p, with bias b): it projects the context tokens and the Gaussian
noise of the masked tokens, so it cannot shrink to kill the noise without also killing the
context (paper Sec. 3, Eq. 6):

    c_i = A s_i + b + psi_i                   (context)
    m_j = A n_j + b + psi_j,  n_j ~ N(0, sigma^2 I_{d_e})   (masked, mode='masked')

b plays the role of the shared mask token m~, as in the official StoP code (which creates a mask
token but never adds it). sigma is a standard deviation, as in the official code.

Modes (config `stop.mode`), the paper's ablations:
  masked     noise on masked tokens only, through the tied A (the default, the method);
  off        I-JEPA: m_j = psi_j + m~ with a learned mask token, no noise;
  context    noise on context tokens only: c_i = A (s_i + n_i) + b + psi_i; m_j as in `off`;
  both       noise on context and masked tokens, both through A;
  fixed_cov  no tying: m_j = psi_j + m~ + e_j, e_j ~ N(0, sigma^2 I_{d_p}) drawn at d_p;
  untied     A' separate from A: m_j = A' n_j + psi_j + m~ (the collapse the paper warns about).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stop_jax.models.layers import BlockStack, dense, init, layer_norm, prefix_order, sincos_2d
from stop_jax.runtime.sharding import ACT_TOKENS, constrain

NOISE_ON_MASKED = ('masked', 'both', 'untied', 'fixed_cov')
NOISE_ON_CONTEXT = ('context', 'both')


class Predictor(nn.Module):
  """Predicts target-block features from context features, one sequence per target block."""

  grid: tuple[int, int]  # (h, w) patch grid of the image.
  encoder_width: int  # d_e
  width: int = 384  # d_p
  depth: int = 6
  num_heads: int = 12
  mlp_dim: int = 1536
  stop_mode: str = 'masked'
  sigma: float = 0.25
  pos_embed: str = 'sincos'  # sincos (fixed) | learned
  dtype: Any = jnp.float32
  gelu: str = 'exact'
  remat: str = 'none'  # none | block | dots
  scan_blocks: bool = True
  attention: str = 'einsum'  # layers.ATTENTION_IMPLS

  @nn.compact
  def __call__(
    self,
    ctx,
    ctx_idx,
    tgt_idx,
    ctx_valid=None,
    tgt_valid=None,
    deterministic: bool = False,
    coarse_idx=None,
    coarse_valid=None,
  ):
    """Runs the predictor.

    Args:
      ctx: [B, Kc, d_e] context-encoder outputs.
      ctx_idx: int [B, Kc] raster indices of the context tokens.
      tgt_idx: int [n, B, Kt] raster indices of each target block's tokens.
      ctx_valid, tgt_valid: optional bool masks of the same shapes as the indices; False slots
        are padding: never attended to (their own outputs are meaningless and must be ignored).
      deterministic: draw no noise (inference tools; the official code draws it in eval too).
        Requires no 'stop' rng.
      coarse_idx, coarse_valid: optional int / bool [n, B, Kq]: also predict each block's cells
        of the 2x coarser grid (Table 8's low-res targets, train/lowres.py). Their masked
        tokens join the block's sequence, built like the others (mask token or StoP noise) at
        the coarse grid's sin-cos position plus a learned level token `lowres_token`.
    Returns:
      [n, B, Kt, d_e] predictions of the target features; with coarse_idx, also the
      [n, B, Kq, d_e] predictions of the coarse cells.
    """
    noisy = not deterministic and self.sigma > 0 and self.stop_mode != 'off'
    psi_ctx, psi_tgt = self._positions(ctx_idx, tgt_idx)
    kt = tgt_idx.shape[-1]
    if coarse_idx is not None:
      # One sequence per block: [context, block tokens, coarse cells].
      psi_tgt = jnp.concatenate([psi_tgt, self._coarse_positions(coarse_idx)], axis=2)
      fine_valid = jnp.ones(tgt_idx.shape, bool) if tgt_valid is None else tgt_valid
      tgt_valid = jnp.concatenate([fine_valid, coarse_valid], axis=2)
    c, m = self._stop_tokens(ctx, psi_ctx, psi_tgt, noisy)
    out = self._predict(c, m, ctx_valid, tgt_valid)
    return out if coarse_idx is None else (out[:, :, :kt], out[:, :, kt:])

  def _positions(self, ctx_idx, tgt_idx):
    """psi at the context and the target indices: [B, Kc, d_p] and [n, B, Kt, d_p]."""
    h, w = self.grid
    if self.pos_embed == 'learned':
      pos = self.param('predictor_pos_embed', init((None, 'embed')), (h * w, self.width))
    else:
      pos = jnp.asarray(sincos_2d(h, w, self.width))  # [N, d_p], fixed
    psi_ctx = jnp.take(pos, ctx_idx, axis=0).astype(self.dtype)  # [B, Kc, d_p]
    psi_tgt = jnp.take(pos, tgt_idx, axis=0).astype(self.dtype)  # [n, B, Kt, d_p]
    return psi_ctx, psi_tgt

  def _coarse_positions(self, coarse_idx):
    """psi of the coarse cells: the (h/2, w/2) grid's sin-cos table plus a learned level token
    (without it a coarse cell's position could equal a fine token's). [n, B, Kq, d_p]."""
    h, w = self.grid
    pos = jnp.asarray(sincos_2d(h // 2, w // 2, self.width))  # [h/2 * w/2, d_p], fixed
    level = self.param('lowres_token', init((None, None, None, 'embed')), (1, 1, 1, self.width))
    return (jnp.take(pos, coarse_idx, axis=0) + level).astype(self.dtype)

  # ---- StoP ------------------------------------------------------------------------------------

  def _stop_tokens(self, ctx, psi_ctx, psi_tgt, noisy: bool):
    """StoP: the context tokens c [B, Kc, d_p] and masked tokens m [n, B, Kt, d_p].

    The tied A (with its bias b) projects the context features and, in modes masked and both,
    the masked tokens' noise. Noise is drawn from the 'stop' stream only when `noisy`.
    """
    embed_a = dense(self.width, (None, 'embed'), self.dtype, 'predictor_embed')
    if noisy and self.stop_mode in NOISE_ON_CONTEXT:
      ctx_noise = self.sigma * jax.random.normal(self.make_rng('stop'), ctx.shape, ctx.dtype)
      ctx_noise = constrain(ctx_noise, ACT_TOKENS)  # drawn shard by shard, not replicated
      self.sow('intermediates', 'ctx_noise', ctx_noise)
      ctx = ctx + ctx_noise
    c = embed_a(ctx) + psi_ctx  # [B, Kc, d_p]  c_i = A s_i + b + psi_i
    m, a_noise = self._masked_tokens(embed_a, psi_tgt, noisy)
    # Noise-to-position ratio ||A n|| / ||psi|| (RMS over tokens), a StoP health metric.
    self.sow(
      'stats',
      'noise_to_pos',
      _rms(a_noise) / _rms(psi_tgt),
      init_fn=lambda: jnp.zeros(()),
      reduce_fn=lambda _, new: new,
    )
    return c, m

  def _masked_tokens(self, embed_a, psi_tgt, noisy: bool):
    """StoP: m [n, B, Kt, d_p] for stop_mode, and its noise term (A n_j, A' n_j or e_j)."""
    n, b, kt, _ = psi_tgt.shape
    mode = self.stop_mode
    if mode in ('masked', 'both'):
      noise = self._noise((n, b, kt, self.encoder_width), noisy)  # n_j, [n, B, Kt, d_e]
      m = embed_a(noise) + psi_tgt  # m_j = A n_j + b + psi_j
      a_noise = m - psi_tgt - nn.unbox(embed_a.variables['params']['bias'])  # A n_j, for the stats
      return m, a_noise
    mask_token = self.param(
      'mask_token', init((None, None, None, 'embed')), (1, 1, 1, self.width)
    )  # m~
    m = psi_tgt + mask_token.astype(self.dtype)
    if mode == 'untied':
      noise = self._noise((n, b, kt, self.encoder_width), noisy)
      # A' n_j with A' not tied to the context projection.
      a_noise = dense(self.width, (None, 'embed'), self.dtype, 'noise_proj', use_bias=False)(noise)
    elif mode == 'fixed_cov':
      a_noise = self._noise((n, b, kt, self.width), noisy)  # e_j at d_p, covariance sigma^2 I
    else:
      a_noise = jnp.zeros_like(m)
    return m + a_noise, a_noise

  # ---------------------------------------------------------------------------------------------

  def _predict(self, c, m, ctx_valid, tgt_valid):
    """The transformer over each [context, target block] sequence: [n, B, Kt, d_e] predictions.

    Args:
      c: [B, Kc, d_p] context tokens.
      m: [n, B, Kt, d_p] masked tokens of each target block.
      ctx_valid, tgt_valid: optional bool [B, Kc], [n, B, Kt]; False = padding.
    """
    b, kc, _ = c.shape
    n, _, kt, _ = m.shape
    x, key_mask = _pack(c, m, ctx_valid, tgt_valid)  # [B*n, Kc+Kt, d_p], bool or None
    order = None
    if self.attention == 'cudnn' and key_mask is not None:
      # The fused kernel masks by lengths: move each row's valid tokens to the front. Blocks
      # are permutation-equivariant over tokens, so un-permuting afterwards is exact.
      order = prefix_order(key_mask)  # [B*n, L]
      x = jnp.take_along_axis(x, order[..., None], axis=1)
      key_mask = jnp.take_along_axis(key_mask, order, axis=1)
    x, _ = BlockStack(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dtype=self.dtype,
      gelu=self.gelu,
      remat=self.remat,
      scan=self.scan_blocks,
      attention=self.attention,
      name='predictor_blocks',
    )(x, key_mask)
    if order is not None:
      x = jnp.take_along_axis(x, jnp.argsort(order, axis=-1)[..., None], axis=1)
    x = layer_norm(self.dtype, 'predictor_norm')(x[:, kc:])  # the target positions
    x = dense(self.encoder_width, ('embed', None), self.dtype, 'predictor_proj')(x)
    return jnp.swapaxes(x.reshape(b, n, kt, self.encoder_width), 0, 1)  # [n, B, Kt, d_e]

  def _noise(self, shape, noisy: bool):
    """sigma * N(0, I) from the 'stop' stream, or zeros when no noise is drawn."""
    if not noisy:
      return jnp.zeros(shape, self.dtype)
    noise = (self.sigma * jax.random.normal(self.make_rng('stop'), shape)).astype(self.dtype)
    # Each device draws only its examples' noise; with JAX's partitionable threefry the values
    # do not depend on the mesh (tests/runtime/test_sharding.py).
    noise = constrain(noise, (None, *ACT_TOKENS))
    # Kept only when the caller asks for mutable=['intermediates'] (parity tests, notebooks).
    self.sow('intermediates', 'noise', noise)
    return noise


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1)))


def _pack(c, m, ctx_valid, tgt_valid):
  """One independent sequence [context, one target block] per (example, target block).

  Example-major: merging [B, n] keeps a batch-sharded B as the leading, sharded factor
  (target-major [n, B] would force XLA to replicate the merged axis across devices).

  Args:
    c: [B, Kc, d_p] context tokens, repeated for each target block.
    m: [n, B, Kt, d_p] masked tokens.
    ctx_valid, tgt_valid: optional bool [B, Kc], [n, B, Kt]; False = padding.
  Returns:
    x [B*n, Kc+Kt, d_p] and the key mask bool [B*n, Kc+Kt] (None when both masks are None).
  """
  b, kc, d = c.shape
  n, _, kt, _ = m.shape
  c = jnp.broadcast_to(c[:, None], (b, n, kc, d)).reshape(b * n, kc, d)
  m = jnp.swapaxes(m, 0, 1).reshape(b * n, kt, d)
  x = constrain(jnp.concatenate([c, m], axis=1), ACT_TOKENS)
  if ctx_valid is None and tgt_valid is None:
    return x, None
  cv = jnp.ones((b, kc), bool) if ctx_valid is None else ctx_valid
  tv = jnp.ones((n, b, kt), bool) if tgt_valid is None else tgt_valid
  cv = jnp.broadcast_to(cv[:, None], (b, n, kc)).reshape(b * n, kc)
  return x, jnp.concatenate([cv, jnp.swapaxes(tv, 0, 1).reshape(b * n, kt)], axis=1)
