"""Paper Fig. 6: what the predictor predicts at one masked patch.

For an image, a context, one target block and one masked patch (`prediction_heatmaps`): the
softmax over the image's patches of the cosine similarity between the predictor's output at that
patch and the target encoder's (layer-normed) features of every patch, the training targets,
divided by a temperature (`DEFAULT_TEMPERATURE`). `heatmap_panels` does it for several images
and runs (StoP next to I-JEPA) with the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from stop_jax.data import masking
from stop_jax.tools.analysis.runs import Run
from stop_jax.tools.analysis.similarity import similarity
from stop_jax.train import step as step_lib

TARGET_RGB = (0.1, 0.1, 0.45)  # Fill of the target block in the plots.

# Softmax temperature of the Fig. 6 maps. A prediction's cosine similarities to the tokens of one
# image lie in a narrow band (the targets are layer-normed features of the same image, so they
# share much of their direction): at temperature 1 the map is nearly uniform (every patch close
# to 1 / (h * w)) and its structure only shows through a colour scale stretched to its range.
# Dividing by 0.1 turns each 0.1 of cosine into a factor e in probability, so the band becomes
# an order of magnitude or more between the least and the most similar patch, while the map
# still spreads over many patches (a smaller value tends to a single arg-max patch and hides
# the second-best locations that tell StoP from I-JEPA). 0.1 is also the scale of the
# temperatures contrastive methods use on cosine similarities, and `similarity.map_entropy`'s.
DEFAULT_TEMPERATURE = 0.1


def sample_target_mask(
  config: ml_collections.ConfigDict, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """One context and one target block with the run's mask settings (untruncated).

  Returns:
    ctx_mask, tgt_mask: bool [h * w] each, disjoint: the context block minus the target block.
  """
  side = config.model.image_size // config.model.patch_size
  k = config.mask
  spec = masking.MaskSpec(
    grid=(side, side),
    num_targets=1,
    target_scale=tuple(k.target_scale),
    target_aspect=tuple(k.target_aspect),
    context_scale=tuple(k.context_scale),
    min_keep=int(k.min_keep),
    mode=k.mode,
  )
  ctx, tgt = masking.sample_block_masks(spec, np.random.default_rng(seed), 1)
  return ctx[0], tgt[0, 0]


def _check_masks(ctx_mask, tgt_mask, num_patches: int):
  ctx_mask, tgt_mask = np.asarray(ctx_mask, bool), np.asarray(tgt_mask, bool)
  if ctx_mask.shape != (num_patches,) or tgt_mask.shape != (num_patches,):
    raise ValueError(
      f'masks {ctx_mask.shape} and {tgt_mask.shape}: expected bool [{num_patches}] each.'
    )
  if not ctx_mask.any() or not tgt_mask.any():
    raise ValueError('the context and the target must each have at least one patch.')
  if np.any(ctx_mask & tgt_mask):
    raise ValueError('a target patch is also in the context: the prediction would be trivial.')
  return ctx_mask, tgt_mask


def _padded(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The raster indices of a bool [N] mask padded to N slots: int32 [N] and valid bool [N]."""
  idx = np.zeros(mask.size, np.int32)
  idx[: mask.sum()] = np.flatnonzero(mask)
  return idx, np.arange(mask.size) < mask.sum()


@functools.partial(jax.jit, static_argnames=('encoder', 'predictor'))
def _predict(encoder, predictor, params, images, ctx_idx, ctx_valid, tgt_idx, tgt_valid, rng):
  """Context encoder then predictor, as in training: [B, Kt, d_e] for tgt_idx [B, Kt]."""
  ctx = encoder.apply({'params': params['encoder']}, images, ctx_idx, ctx_valid)
  noise = {'deterministic': True} if rng is None else {'rngs': {'stop': rng}}
  args = (ctx, ctx_idx, tgt_idx[None], ctx_valid, tgt_valid[None])
  return predictor.apply({'params': params['predictor']}, *args, **noise)[0]


def predict_masked_tokens(
  run: Run, image, ctx_mask, tgt_mask, rng: jax.Array | None = None
) -> np.ndarray:
  """The predictor's outputs at the target patches of one image, as in training.

  Both index sets are padded to all h * w slots (padding is never attended to, as in training),
  so that every mask of a run shares one compiled computation.

  Args:
    run: the model (config and params).
    image: normalised [H, W, 3].
    ctx_mask, tgt_mask: bool [h * w], disjoint.
    rng: key of the StoP noise; None draws no noise (the mean position psi_j + b).
  Returns:
    float32 [K_t, d_e], one row per target patch in raster order.
  """
  h, w = run.grid
  ctx_mask, tgt_mask = _check_masks(ctx_mask, tgt_mask, h * w)
  (ctx_idx, ctx_valid), (tgt_idx, tgt_valid) = _padded(ctx_mask), _padded(tgt_mask)
  images = jnp.asarray(image, jnp.float32)[None]  # [1, H, W, 3]
  batch = (ctx_idx[None], ctx_valid[None], tgt_idx[None], tgt_valid[None])  # [1, N] each
  pred = _predict(run.encoder, run.predictor, run.params, images, *batch, rng)
  return np.asarray(pred[0, : tgt_mask.sum()], np.float32)


@functools.partial(jax.jit, static_argnames=('encoder', 'num_layers', 'combine'))
def _target_features(encoder, target_params, images, num_layers, combine):
  return step_lib.target_features(encoder, target_params, images, num_layers, combine)


def image_tokens(run: Run, image) -> np.ndarray:
  """The training targets of every patch: layer-normed target-encoder features, [h * w, d_e]."""
  images = jnp.asarray(image, jnp.float32)[None]
  loss = run.config.loss
  feats = _target_features(
    run.encoder, run.target_params, images, loss.num_target_layers, loss.multi_layer_target
  )
  return np.asarray(feats[0], np.float32)


def token_similarity_softmax(pred, tokens, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
  """softmax_k(cos(pred, token_k) / temperature): where in the image a prediction points.

  Args:
    pred: [..., D] predicted tokens; tokens: [N, D] the image's tokens.
  Returns:
    float32 [..., N], summing to 1 over N.
  """
  if temperature <= 0:
    raise ValueError(f'temperature={temperature}: expected > 0.')
  sims = similarity(pred, tokens, 'cosine')
  return np.asarray(jax.nn.softmax(jnp.asarray(sims) / temperature, axis=-1))


def prediction_heatmaps(
  run: Run,
  image,
  ctx_mask,
  tgt_mask,
  patches: Sequence[int],
  rng: jax.Array | None = None,
  temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
  """Fig. 6 maps: where in the image the prediction at each chosen target patch points.

  Each map is the softmax over the image's patches of the cosine similarity between the
  prediction and every target-encoder token (the training targets).

  Args:
    run, image, ctx_mask, tgt_mask, rng: as for `predict_masked_tokens`.
    patches: P raster indices, each inside the target block.
    temperature: softmax temperature, > 0 (`DEFAULT_TEMPERATURE` says why not 1).
  Returns:
    float32 [P, h, w], each map summing to 1.
  """
  h, w = run.grid
  tgt_idx = np.flatnonzero(np.asarray(tgt_mask, bool))
  patches = [int(p) for p in patches]
  missing = [p for p in patches if p not in set(tgt_idx.tolist())]
  if missing or not patches:
    raise ValueError(
      f'patches {missing or patches} are not in the target block {tgt_idx.tolist()}.'
    )
  pred = predict_masked_tokens(run, image, ctx_mask, tgt_mask, rng)  # [Kt, D]
  rows = np.searchsorted(tgt_idx, patches)
  probs = token_similarity_softmax(pred[rows], image_tokens(run, image), temperature)
  return probs.reshape(len(patches), h, w)


@dataclasses.dataclass(frozen=True)
class HeatmapPanel:
  """One image of Fig. 6: its masks, the chosen patch and one map per run (or noise draw)."""

  image: np.ndarray  # normalised [H, W, 3]
  ctx_mask: np.ndarray  # bool [h * w]
  tgt_mask: np.ndarray  # bool [h * w]
  patch: int  # raster index in the target block: the middle one
  maps: dict[str, np.ndarray]  # title -> float32 [h, w], each summing to 1


def heatmap_panels(
  compared: Mapping[str, Run],
  images,
  temperature: float = DEFAULT_TEMPERATURE,
  seed: int = 0,
  noise_draws: int = 0,
) -> list[HeatmapPanel]:
  """Fig. 6 maps of every image for every run, each image with the same masks for all runs.

  Image i gets the context and target block `sample_target_mask(first run's config, seed + i)`
  and the middle patch of that block. Each run contributes its noise-free prediction (the mean
  position psi_j + b, what I-JEPA always uses) and, with `noise_draws` > 0, that many StoP draws.

  Args:
    compared: title -> run, all on one patch grid.
    images: normalised [N, H, W, 3].
  Returns:
    N panels, maps titled `title` (noise off) and `title, draw k`.
  """
  if not compared:
    raise ValueError('no run to draw.')
  first = next(iter(compared.values()))
  grids = {title: r.grid for title, r in compared.items()}
  if len(set(grids.values())) > 1:
    raise ValueError(f'runs on different patch grids {grids}: the maps would not align.')
  panels = []
  for i, image in enumerate(np.asarray(images, np.float32)):
    ctx_mask, tgt_mask = sample_target_mask(first.config, seed=seed + i)
    target = np.flatnonzero(tgt_mask)
    patch = int(target[len(target) // 2])
    maps = {}
    for title, r in compared.items():
      draws = {title: None}
      draws.update({f'{title}, draw {k}': jax.random.key(seed + k) for k in range(noise_draws)})
      for name, key in draws.items():
        maps[name] = prediction_heatmaps(r, image, ctx_mask, tgt_mask, [patch], key, temperature)[0]
    panels.append(HeatmapPanel(image, ctx_mask, tgt_mask, patch, maps))
  return panels


def denormalise(image) -> np.ndarray:
  """Pipeline-normalised pixels back to [0, 1] for display. [H, W, 3] -> [H, W, 3]."""
  # The data pipeline imports TensorFlow: only pay for it when an image is shown.
  from stop_jax.data.augment import MEAN_RGB, STD_RGB

  return np.clip(np.asarray(image, np.float32) * np.array(STD_RGB) + np.array(MEAN_RGB), 0, 1)


def _outline(ax, patch: int, grid, image_shape, color='white'):
  h, w = grid
  ph, pw = image_shape[0] / h, image_shape[1] / w
  r, c = divmod(patch, w)
  rect = plt.Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor=color, lw=1.5)
  ax.add_patch(rect)


def plot_prediction_heatmaps(
  image,
  ctx_mask,
  tgt_mask,
  patch: int,
  heatmaps: Mapping[str, Any],
  alpha: float = 0.6,
  cmap: str = 'jet',
):
  """The masked image next to each heatmap overlaid on the image (paper Fig. 6).

  The first panel shows the context, the target block in dark blue and the chosen patch
  outlined in white; patches in neither are dimmed.

  Args:
    image: normalised [H, W, 3].
    ctx_mask, tgt_mask: bool [h * w].
    patch: raster index of the patch whose prediction the maps show.
    heatmaps: title -> [h, w] map.
  Returns:
    The matplotlib Figure (1 + len(heatmaps) axes, plus one colour bar).
  """
  shown = denormalise(image)
  ctx_mask, tgt_mask = np.asarray(ctx_mask, bool), np.asarray(tgt_mask, bool)
  maps = {k: np.asarray(v, np.float32) for k, v in heatmaps.items()}
  if not maps:
    raise ValueError('no heatmap to plot.')
  grid = next(iter(maps.values())).shape
  if any(m.shape != grid for m in maps.values()) or ctx_mask.size != grid[0] * grid[1]:
    raise ValueError(f'heatmaps {[m.shape for m in maps.values()]} and masks do not share a grid.')
  ph, pw = shown.shape[0] // grid[0], shown.shape[1] // grid[1]
  up = lambda m: np.kron(m.reshape(grid), np.ones((ph, pw)))[..., None]  # noqa: E731  [H, W, 1]
  # Dark blue rather than the paper's black: many images (digits) have a black background.
  masked = up(np.where(ctx_mask, 1.0, 0.35)) * shown
  masked = np.where(up(tgt_mask) > 0, np.array(TARGET_RGB), masked)
  fig, axes = plt.subplots(
    1, 1 + len(maps), figsize=(2.6 * (1 + len(maps)) + 0.6, 2.8), layout='constrained'
  )
  axes[0].imshow(masked)
  axes[0].set_title('context / target', fontsize=9)
  _outline(axes[0], patch, grid, shown.shape)
  # One colour scale for all maps, spanning their values (not from 0), so that the panels of
  # two runs compare and a map that is close to uniform still shows where it peaks.
  lo = min(float(m.min()) for m in maps.values())
  hi = max(float(m.max()) for m in maps.values())
  extent = (-0.5, shown.shape[1] - 0.5, shown.shape[0] - 0.5, -0.5)
  for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
    ax.imshow(shown)
    im = ax.imshow(
      m, cmap=cmap, alpha=alpha, extent=extent, vmin=lo, vmax=hi, interpolation='nearest'
    )
    _outline(ax, patch, grid, shown.shape)
    ax.set_title(name, fontsize=9)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(im, ax=list(axes[1:]), shrink=0.8)
  return fig
