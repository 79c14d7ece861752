"""The official I-JEPA / StoP models, written again in PyTorch in the official module layout.

The reference we compare with, number by number, in two places:
  - `tests/tools/test_convert.py` gives these modules random weights, saves them as an official
    checkpoint, converts it and checks that our models agree to 1e-4 relative;
  - `bench/torch_reference.py` times the official StoP train step built from them against ours.

Written from the official code (I-JEPA `src/models/vision_transformer.py`; StoP `src/deit.py`),
not from ours: the sin-cos table below does not call `stop_jax.models`, so the parity test checks
two independent implementations. The layout (and hence the state-dict keys) is the official one:
`patch_embed.proj` Conv2d, a fixed 2D sin-cos `pos_embed` Parameter without grad, pre-norm
`blocks` with `attn.qkv` / `attn.proj` / `mlp.fc1` / `mlp.fc2` and LayerNorm eps 1e-6, `norm`; a
predictor with `predictor_embed`, `mask_token`, `predictor_pos_embed`, `predictor_blocks`,
`predictor_norm`, `predictor_proj`.

Needs torch (`pip install 'stop_jax[torch]'`); nothing else in the package imports this module.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from stop_jax import config as config_lib


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """The official fixed 2D sin-cos table [grid * grid, dim]: w goes first in the meshgrid."""

  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  coords = np.arange(grid, dtype=np.float64)
  g = np.stack(np.meshgrid(coords, coords))
  return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


def fixed_table(dim: int, grid: int) -> nn.Parameter:
  """[1, grid * grid, dim] sin-cos, a Parameter without grad as the official one: it is in the
  state dict and in the optimiser's groups, where its None grad skips it."""
  return nn.Parameter(torch.from_numpy(sincos_2d(dim, grid)).float()[None], requires_grad=False)


def apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
  """Official: gather each mask's tokens [B, K] from x [B, N, D], concatenated along the batch."""
  return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks])


class Attention(nn.Module):
  """Official attention: explicit softmax(q k^T / sqrt(d_h)) v; returns (output, probs)."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, d_h]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)), attn


class MLP(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  """Pre-norm block. `checkpoint=True` is StoP's: attn and mlp (not the norms) each wrapped in
  the reentrant `torch.utils.checkpoint`, so the backward recomputes both forwards; I-JEPA's
  blocks do not checkpoint."""

  def __init__(self, dim: int, heads: int, hidden: int, checkpoint: bool = False):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = MLP(dim, hidden)
    self.checkpoint = checkpoint

  def _run(self, fn, x):
    # Under no_grad (the target encoder) a checkpoint stores nothing and recomputes nothing, but
    # the reentrant one warns that no input requires grad: skip it there, same arithmetic.
    if self.checkpoint and torch.is_grad_enabled():
      return torch_checkpoint.checkpoint(fn, x, use_reentrant=True)
    return fn(x)

  def forward(self, x):
    y, _ = self._run(self.attn, self.norm1(x))
    x = x + y
    return x + self._run(self.mlp, self.norm2(x))


class PatchEmbed(nn.Module):
  """Stride-p Conv2d on NCHW images -> tokens [B, N, D] in raster order."""

  def __init__(self, patch: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class VisionTransformer(nn.Module):
  """The official encoder; `masks` keeps tokens after the position embedding (the whole image is
  patch-embedded first, as in the official code)."""

  def __init__(self, grid, patch, dim, depth, heads, hidden, checkpoint=False):
    super().__init__()
    self.patch_embed = PatchEmbed(patch, dim)
    self.pos_embed = fixed_table(dim, grid)
    self.blocks = nn.ModuleList([Block(dim, heads, hidden, checkpoint) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, masks=None, K=1):  # noqa: N803 (the official argument name)
    """StoP's `K`: the mean of the last K blocks' outputs, each after the final norm."""
    x = self.patch_embed(x) + self.pos_embed  # [B, N, D]
    if masks is not None:
      x = apply_masks(x, masks)
    last = []
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if i >= len(self.blocks) - K:
        last.append(self.norm(x))
    return sum(last) / len(last)


class Predictor(nn.Module):
  """I-JEPA's `VisionTransformerPredictor`, and StoP's when it is given noise or a `sigma`.

  The masked tokens are psi_j + mask_token (I-JEPA), or StoP's psi_j + predictor_embed(n_j):
  the tied input Linear applied to noise n_j in the encoder's width, its bias standing for m~, and
  no mask token. Each target block's tokens are concatenated with the context as a sequence of its
  own, target-major (row i * B + b).
  """

  def __init__(self, grid, embed_dim, dim, depth, heads, sigma=None, checkpoint=False):
    super().__init__()
    self.sigma = sigma
    self.predictor_embed = nn.Linear(embed_dim, dim)
    # StoP's predictor creates it too and never uses it: with noise on it gets no grad.
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.predictor_pos_embed = fixed_table(dim, grid)
    self.predictor_blocks = nn.ModuleList(
      [Block(dim, heads, 4 * dim, checkpoint) for _ in range(depth)]
    )
    self.predictor_norm = nn.LayerNorm(dim, eps=1e-6)
    self.predictor_proj = nn.Linear(dim, embed_dim)

  def forward(self, x_enc, masks_x, masks, noise=None, ctx_noise=None):
    """x_enc [B, Kc, De]; masks_x: [[B, Kc]]; masks: n x [B, Kt]; noise: n x [B, Kt, De] (given
    noise wins; else N(0, sigma^2) from torch's global generator when `sigma` is set; else the
    mask token). ctx_noise [B, Kc, De]: the paper's context-noise ablation (not in the official
    code), c_i = A (s_i + n_i) + b + psi_i. Returns [n * B, Kt, De]."""
    if len(masks_x) != 1:
      # The official code folds several context masks into the batch; StoP trains with one.
      raise ValueError(f'{len(masks_x)} context masks: this reference takes one context mask.')
    if ctx_noise is not None:
      x_enc = x_enc + ctx_noise
    x = self.predictor_embed(x_enc)  # [B, Kc, Dp]
    b, n_ctx, _ = x.shape
    x = x + apply_masks(self.predictor_pos_embed.repeat(b, 1, 1), masks_x)
    seqs = []
    for i, m in enumerate(masks):
      pos = apply_masks(self.predictor_pos_embed.repeat(b, 1, 1), [m])  # [B, Kt, Dp]
      if noise is not None:
        tokens = pos + self.predictor_embed(noise[i])
      elif self.sigma is not None:
        n_j = torch.normal(0.0, self.sigma, size=(b, m.size(1), x_enc.size(-1)))
        tokens = pos + self.predictor_embed(n_j)
      else:
        tokens = pos + self.mask_token
      seqs.append(torch.cat([x, tokens], dim=1))
    x = torch.cat(seqs)  # [n * B, Kc + Kt, Dp]
    for blk in self.predictor_blocks:
      x = blk(x)
    return self.predictor_proj(self.predictor_norm(x)[:, n_ctx:])  # [n * B, Kt, De]


def official_modules(config, sigma=None, checkpoint=False) -> dict[str, nn.Module]:
  """Encoder, target encoder and predictor for our `config`'s shapes, with torch's default init.

  `sigma` makes the predictor draw StoP noise itself; `checkpoint` recomputes the blocks as StoP.
  """
  m, p = config.model, config.predictor
  width, depth, heads, ratio = config_lib.vit_shape(m)
  grid = m.image_size // m.patch_size
  vit = (grid, m.patch_size, width, depth, heads, int(width * ratio), checkpoint)
  pred_heads = p.num_heads if p.num_heads > 0 else heads
  return {
    'encoder': VisionTransformer(*vit),
    'target_encoder': VisionTransformer(*vit),
    'predictor': Predictor(grid, width, p.width, p.depth, pred_heads, sigma, checkpoint),
  }


def init_official(module: nn.Module):
  """StoP's init: trunc_normal(0.02) on every Linear / Conv2d kernel and the mask token, zero
  biases, LayerNorm 1 / 0 (the official depth rescale is undone by this re-init there too)."""
  for mod in module.modules():
    if isinstance(mod, nn.Linear | nn.Conv2d):
      nn.init.trunc_normal_(mod.weight, std=0.02)
      nn.init.zeros_(mod.bias)
    elif isinstance(mod, nn.LayerNorm):
      nn.init.ones_(mod.weight)
      nn.init.zeros_(mod.bias)
  if isinstance(module, Predictor):
    nn.init.trunc_normal_(module.mask_token, std=0.02)
