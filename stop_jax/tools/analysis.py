"""Looking inside trained runs: the paper's Figs. 4, 5 and 6 as tested functions and plots.

The analysis notebooks in `notebooks/` (all but the quickstart) only call what is here.

- Fig. 5 (`position_similarity_maps`): a stochastic masked-token position
  `m_j = A n_j + b + psi_j`, `n_j ~ N(0, sigma^2 I_{d_e})`, compared with every fixed sin-cos
  position psi_k: how well does the query still point at its own patch j, for several sigma and
  for the learned A of a run or a random one?
- Fig. 6 (`prediction_heatmaps`): for an image, a context, one target block and one masked patch,
  the softmax over the image's patches of the cosine similarity between the predictor's output
  at that patch and the target encoder's (layer-normed) features of every patch.
- Fig. 4 (`regularisation_table`): ||A||_F and ||b|| (b is StoP's mask token m~) at the end of
  runs that differ in sigma, read from their `metrics.jsonl` and `config.json`.

`load_run` rebuilds a run's locked config from its `config.json` and reads its checkpoint;
`ensure_tiny_run` trains the offline tiny config for a few steps when a notebook has no run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.data import masking
from stop_jax.models.layers import INIT, sincos_2d
from stop_jax.runtime import checkpointing
from stop_jax.train import step as step_lib

METRICS = ('cosine', 'dot')
TARGET_RGB = (0.1, 0.1, 0.45)  # Fill of the target block in Fig. 6 plots.
# Axis labels of the metrics Fig. 4 plots; other keys are labelled by their name.
METRIC_LABELS = {
  'A_norm': r'$\|A\|_F$',
  'A_bias_norm': r'$\|\tilde{m}\| = \|b\|$',
  'noise_to_pos': r'$\|A n\| / \|\psi\|$',
}

# ---------------------------------------------------------------------------------------------
# Runs and configs.


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a finished checkpoint (orbax names them by step)."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run read back for analysis: host arrays, no optimiser state."""

  workdir: str
  config: ml_collections.ConfigDict
  step: int
  params: dict  # {'encoder': ..., 'predictor': ...}
  target_params: dict  # The EMA target encoder.

  @property
  def encoder(self) -> nn.Module:
    return models.build_encoder(self.config)

  @property
  def predictor(self) -> nn.Module:
    return models.build_predictor(self.config)

  @property
  def grid(self) -> tuple[int, int]:
    side = self.config.model.image_size // self.config.model.patch_size
    return side, side

  def projection(self) -> tuple[np.ndarray, np.ndarray]:
    """StoP's tied A and its bias b (the mask token): float32 [d_e, d_p] and [d_p]."""
    embed = self.params['predictor']['predictor_embed']
    return np.asarray(embed['kernel'], np.float32), np.asarray(embed['bias'], np.float32)

  def positions(self) -> np.ndarray:
    """The predictor's position table psi, float32 [h * w, d_p] (learned or fixed sin-cos)."""
    if self.config.predictor.pos_embed == 'learned':
      return np.asarray(self.params['predictor']['predictor_pos_embed'], np.float32)
    return sincos_2d(*self.grid, self.config.predictor.width)


def load_run(workdir: str, step: int | None = None) -> Run:
  """Config and checkpoint (the latest one, or `step`) of a run directory."""
  config = config_lib.load_json(workdir)
  step, tree = checkpointing.load_checkpoint(workdir, step)
  # Params may carry logical-partitioning boxes; analysis only needs the arrays.
  params = nn.meta.unbox(tree['params'])
  return Run(workdir, config, int(step), params, nn.meta.unbox(tree['target_params']))


def tiny_config(
  steps: int, overrides: Mapping[str, Any] | None = None, log_every_steps: int = 5
) -> ml_collections.ConfigDict:
  """configs/tiny.py stopped after `steps` steps (schedules unchanged), probe off.

  Args:
    steps: training steps.
    overrides: dotted keys, e.g. {'stop.sigma': 0.5}.
    log_every_steps: metrics.jsonl granularity (short runs need more than the default).
  """
  if steps < 1:
    raise ValueError(f'steps={steps}: a run needs at least one step.')
  config = config_lib.load_config_file('tiny.py', f'steps={steps}')
  config.eval.probe = False
  config.log_every_steps = log_every_steps
  config.checkpoint.every_steps = 0  # Only the final state: what the analysis reads.
  for dotted, value in (overrides or {}).items():
    *groups, key = dotted.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[key] = tuple(value) if isinstance(value, list) else value
  return config


def ensure_tiny_run(
  workdir: str, steps: int = 40, overrides: Mapping[str, Any] | None = None
) -> bool:
  """Trains `tiny_config(steps, overrides)` into `workdir` unless it already has a checkpoint.

  Returns:
    True when it trained, False when an existing run was kept.
  """
  if has_checkpoint(workdir):
    return False
  # The trainer pulls in TensorFlow (input pipeline): imported only when a run is trained.
  from stop_jax.train import loop as trainer

  trainer.train_and_evaluate(tiny_config(steps, overrides), workdir)
  return True


# ---------------------------------------------------------------------------------------------
# Fig. 5: stochastic positions against the deterministic ones.


def similarity(queries, keys, metric: str = 'cosine') -> np.ndarray:
  """Cosine or dot-product similarity of every query with every key.

  Args:
    queries: [..., d]; keys: [N, d].
  Returns:
    float32 [..., N].
  """
  if metric not in METRICS:
    raise ValueError(f'metric={metric!r}: expected one of {METRICS}.')
  q = jnp.asarray(queries, jnp.float32)
  k = jnp.asarray(keys, jnp.float32)
  if q.shape[-1] != k.shape[-1] or k.ndim != 2:
    raise ValueError(f'queries {q.shape} and keys {k.shape} must be [..., d] and [N, d].')
  if metric == 'cosine':
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
  return np.asarray(q @ k.T)


def random_projection(rng: jax.Array, encoder_width: int, predictor_width: int):
  """A as initialised before training (trunc-normal std 0.02) with b = 0: the 'random A'.

  Returns:
    float32 kernel [d_e, d_p] and bias [d_p].
  """
  kernel = INIT(rng, (encoder_width, predictor_width), jnp.float32)
  return np.asarray(kernel), np.zeros((predictor_width,), np.float32)


def default_queries(grid: tuple[int, int]) -> tuple[int, ...]:
  """Three raster indices on the diagonal: upper-left quarter, centre, lower-right quarter."""
  h, w = grid
  return tuple(
    int(r * w + c) for r, c in ((h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 4))
  )


def position_similarity_maps(
  a_kernel,
  a_bias,
  pos,
  grid: tuple[int, int],
  query_idx: Sequence[int],
  sigmas: Sequence[float],
  rng: jax.Array,
  num_samples: int = 256,
  metric: str = 'cosine',
  average: bool = True,
) -> np.ndarray:
  """Similarity of stochastic queries m_j = A n_j + b + psi_j to every position psi_k (Fig. 5).

  Every sigma uses the same standard-normal draws (scaled by sigma), so the maps differ only
  through sigma. sigma = 0 is the deterministic sin-cos query psi_j + b.

  Args:
    a_kernel: A, [d_e, d_p] (as stored by the Dense: queries are n @ A).
    a_bias: b, [d_p].
    pos: psi, [h * w, d_p].
    grid: (h, w).
    query_idx: raster indices j of the query positions, Q of them.
    sigmas: noise standard deviations (the config's stop.sigma), each >= 0.
    rng: key of the noise draws.
    num_samples: noise samples S per query.
    metric: 'cosine' or 'dot'.
    average: mean over the samples, or keep each one.
  Returns:
    float32 [len(sigmas), Q, h, w] (average) or [len(sigmas), Q, S, h, w].
  """
  a = np.asarray(a_kernel, np.float32)
  b = np.asarray(a_bias, np.float32)
  pos = np.asarray(pos, np.float32)
  h, w = grid
  if a.ndim != 2 or b.shape != (a.shape[1],) or pos.shape != (h * w, a.shape[1]):
    raise ValueError(
      f'expected A [d_e, d_p], b [d_p], psi [h*w={h * w}, d_p]; got {a.shape}, {b.shape}, '
      f'{pos.shape}.'
    )
  query_idx = np.asarray(query_idx, np.int64).reshape(-1)
  if query_idx.size == 0 or query_idx.min() < 0 or query_idx.max() >= h * w:
    raise ValueError(f'query_idx={query_idx.tolist()}: expected raster indices in [0, {h * w}).')
  sigmas = np.asarray(sigmas, np.float32).reshape(-1)
  if sigmas.size == 0 or not np.all(np.isfinite(sigmas) & (sigmas >= 0)):
    raise ValueError(f'sigmas={sigmas.tolist()}: expected finite standard deviations >= 0.')
  if num_samples < 1:
    raise ValueError(f'num_samples={num_samples}: expected >= 1.')
  noise = np.asarray(jax.random.normal(rng, (num_samples, query_idx.size, a.shape[0])))
  center = b + pos[query_idx]  # [Q, d_p]
  out = []
  for sigma in sigmas:
    queries = sigma * (noise @ a) + center  # [S, Q, d_p]
    sims = similarity(queries, pos, metric)  # [S, Q, N]
    out.append(sims.mean(0) if average else np.swapaxes(sims, 0, 1))
  stacked = np.stack(out)  # [len(sigmas), Q, (S,) N]
  return stacked.reshape(*stacked.shape[:-1], h, w)


def spatial_softmax(scores, temperature: float = 1.0) -> np.ndarray:
  """softmax(scores / temperature) over the last two (grid) axes. [..., h, w] -> [..., h, w]."""
  if temperature <= 0:
    raise ValueError(f'temperature={temperature}: expected > 0.')
  s = jnp.asarray(scores, jnp.float32)
  flat = s.reshape(*s.shape[:-2], -1) / temperature
  return np.asarray(jax.nn.softmax(flat, axis=-1).reshape(s.shape))


def map_entropy(scores, temperature: float = 0.1) -> np.ndarray:
  """Entropy (nats) of `spatial_softmax(scores, temperature)`: log(h * w) for a flat map.

  A summary of how spread out a similarity map is. The default temperature suits cosine
  similarities, which live in [-1, 1]. [..., h, w] -> [...].
  """
  p = spatial_softmax(scores, temperature)
  p = p.reshape(*p.shape[:-2], -1)
  return -np.sum(p * np.log(np.maximum(p, 1e-30)), axis=-1)


def plot_similarity_maps(
  maps,
  grid: tuple[int, int],
  query_idx: Sequence[int],
  column_titles: Sequence[str],
  title: str | None = None,
  cmap: str = 'viridis',
):
  """A grid of similarity maps: one row per query position, one column per setting.

  Each row shares one colour scale, so a map that flattens also looks flat. The query's own
  position is marked with a red cross.

  Args:
    maps: [C, Q, h, w], e.g. `position_similarity_maps(...)` with C sigmas.
    grid: (h, w).
    query_idx: the Q raster indices of the queries.
    column_titles: C titles.
  Returns:
    The matplotlib Figure (Q * C axes, plus one colour bar per row).
  """
  maps = np.asarray(maps, np.float32)
  h, w = grid
  query_idx = list(query_idx)
  if maps.ndim != 4 or maps.shape[1] != len(query_idx) or maps.shape[2:] != (h, w):
    raise ValueError(f'maps {maps.shape}: expected [C, Q={len(query_idx)}, {h}, {w}].')
  cols, rows = maps.shape[0], maps.shape[1]
  if len(column_titles) != cols:
    raise ValueError(f'{len(column_titles)} column titles for {cols} columns.')
  fig, axes = plt.subplots(
    rows, cols, figsize=(2.2 * cols + 0.8, 2.2 * rows), squeeze=False, layout='constrained'
  )
  for r, q in enumerate(query_idx):
    lo, hi = float(maps[:, r].min()), float(maps[:, r].max())
    for c in range(cols):
      ax = axes[r, c]
      im = ax.imshow(maps[c, r], cmap=cmap, vmin=lo, vmax=hi, interpolation='nearest')
      ax.plot(q % w, q // w, 'rx', markersize=6)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(column_titles[c], fontsize=9)
      if c == 0:
        ax.set_ylabel(f'query ({q // w}, {q % w})', fontsize=9)
    fig.colorbar(im, ax=list(axes[r]), shrink=0.8)
  if title:
    fig.suptitle(title)
  return fig


# ---------------------------------------------------------------------------------------------
# Fig. 6: what the predictor predicts at one masked patch.


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


def predict_masked_tokens(
  run: Run, image, ctx_mask, tgt_mask, rng: jax.Array | None = None
) -> np.ndarray:
  """The predictor's outputs at the target patches of one image, as in training.

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
  ctx_idx = np.flatnonzero(ctx_mask).astype(np.int32)[None]  # [1, Kc]
  tgt_idx = np.flatnonzero(tgt_mask).astype(np.int32)[None, None]  # [1, 1, Kt]
  images = jnp.asarray(image, jnp.float32)[None]  # [1, H, W, 3]
  ctx = run.encoder.apply({'params': run.params['encoder']}, images, ctx_idx)
  noise = {'deterministic': True} if rng is None else {'rngs': {'stop': rng}}
  pred = run.predictor.apply({'params': run.params['predictor']}, ctx, ctx_idx, tgt_idx, **noise)
  return np.asarray(pred[0, 0], np.float32)


def image_tokens(run: Run, image) -> np.ndarray:
  """The training targets of every patch: layer-normed target-encoder features, [h * w, d_e]."""
  images = jnp.asarray(image, jnp.float32)[None]
  feats = step_lib.target_features(
    run.encoder, run.target_params, images, run.config.loss.num_target_layers
  )
  return np.asarray(feats[0], np.float32)


def token_similarity_softmax(pred, tokens, temperature: float = 1.0) -> np.ndarray:
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
  temperature: float = 1.0,
) -> np.ndarray:
  """Fig. 6 maps: where in the image the prediction at each chosen target patch points.

  Each map is the softmax over the image's patches of the cosine similarity between the
  prediction and every target-encoder token (the training targets).

  Args:
    run, image, ctx_mask, tgt_mask, rng: as for `predict_masked_tokens`.
    patches: P raster indices, each inside the target block.
    temperature: softmax temperature (the paper: 1).
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


def denormalise(image) -> np.ndarray:
  """Pipeline-normalised pixels back to [0, 1] for display. [H, W, 3] -> [H, W, 3]."""
  # input_pipeline imports TensorFlow: only pay for it when an image is shown.
  from stop_jax.data.pipeline import MEAN_RGB, STD_RGB

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
  # One colour scale for all maps, spanning their values: softmax(cos / 1) is close to uniform,
  # so a scale from 0 would hide the structure.
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


# ---------------------------------------------------------------------------------------------
# Fig. 4: ||A|| and ||m~|| against sigma, from runs' metrics.


def read_metrics(workdir: str) -> list[dict]:
  """Every line of `workdir/metrics.jsonl`, in file order (a resumed run appends)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} has no training metrics.')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def metric_series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps int [T], values float [T]) of one metric, sorted by step.

  A step logged twice (a run resumed from an older checkpoint) keeps its last value.
  """
  by_step = {int(r['step']): float(r[key]) for r in rows if key in r}
  if not by_step:
    raise KeyError(f'metric {key!r} is in none of the {len(rows)} rows.')
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps], np.float64)


def regularisation_table(
  workdirs: Sequence[str], keys: Sequence[str] = ('A_norm', 'A_bias_norm'), last: int = 1
) -> dict[str, Any]:
  """One row per run, sorted by sigma: its StoP setting and the final values of `keys`.

  Args:
    workdirs: run directories (config.json and metrics.jsonl).
    keys: metrics to read.
    last: average of the last `last` logged values (smooths a noisy end of training).
  Returns:
    {'workdir': [R] str, 'mode': [R] str, 'sigma': float [R], 'step': int [R] (last step read),
     and each key: float [R]}.
  """
  if not workdirs:
    raise ValueError('no run directory given.')
  if last < 1:
    raise ValueError(f'last={last}: expected >= 1.')
  rows = []
  for workdir in workdirs:
    config = config_lib.load_json(workdir)
    metrics = read_metrics(workdir)
    row = {'workdir': workdir, 'mode': config.stop.mode, 'sigma': float(config.stop.sigma)}
    for key in keys:
      steps, values = metric_series(metrics, key)
      row[key] = float(values[-last:].mean())
      row['step'] = int(steps[-1])
    rows.append(row)
  rows.sort(key=lambda r: (r['sigma'], r['mode']))
  table = {k: [r[k] for r in rows] for k in ('workdir', 'mode')}
  table['sigma'] = np.array([r['sigma'] for r in rows])
  table['step'] = np.array([r['step'] for r in rows], np.int64)
  for key in keys:
    table[key] = np.array([r[key] for r in rows])
  return table


def plot_regularisation(table: Mapping[str, Any], keys: Sequence[str] = ('A_norm', 'A_bias_norm')):
  """Each metric against sigma (paper Fig. 4), one line per StoP mode.

  Returns:
    The matplotlib Figure (len(keys) axes).
  """
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  modes = list(dict.fromkeys(table['mode']))
  for ax, key in zip(axes[0], keys, strict=True):
    for mode in modes:
      sel = np.array([m == mode for m in table['mode']])
      ax.plot(table['sigma'][sel], np.asarray(table[key])[sel], 'o-', label=f'stop.mode={mode}')
    ax.set_xlabel(r'$\sigma$')
    ax.set_ylabel(METRIC_LABELS.get(key, key))
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_metric_curves(workdirs: Sequence[str], keys: Sequence[str] = ('A_norm', 'A_bias_norm')):
  """Training curves of `keys`, one line per run labelled by its sigma.

  Returns:
    The matplotlib Figure (len(keys) axes).
  """
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for workdir in workdirs:
    config = config_lib.load_json(workdir)
    rows = read_metrics(workdir)
    label = rf'$\sigma$={config.stop.sigma:g} ({config.stop.mode})'
    for ax, key in zip(axes[0], keys, strict=True):
      ax.plot(*metric_series(rows, key), label=label)
  for ax, key in zip(axes[0], keys, strict=True):
    ax.set_xlabel('step')
    ax.set_ylabel(METRIC_LABELS.get(key, key))
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  return fig
