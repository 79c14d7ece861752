"""DAVIS 2017 video object segmentation by label propagation with a frozen encoder (`davis`).

The protocol of DINO's `eval_video_segmentation.py`, which the StoP paper follows (Table 3),
written for JAX:

1. Every frame is resized (`davis_data.frame_size`: 854x480 -> 832x480 by default) and encoded
   by the frozen target encoder; its last-layer patch tokens (after the final norm), L2-normalised,
   are the frame's features [N, D] on an h x w token grid. The position table at that grid comes
   from `eval.davis_pos_embed` (`models.vit.position_table`).
2. The first frame's mask, resized to the token grid, gives one-hot labels [N, C].
3. Frame t's labels come from a context of the first frame and the `n_last_frames` frames before
   t (their propagated soft labels): for each query token, the affinity to a context token is
   exp(cos / temperature), zero outside a (2 * size_mask_neighborhood + 1)^2 window of the query's
   position; only the top-k affinities over all context frames are kept, normalised to sum to 1,
   and the query's soft labels are that weighted sum of the context's labels (`propagate`).
4. The soft labels are upsampled bilinearly by the patch size, each label's map min-max
   normalised over the frame, and the argmax is resized (nearest) to the frame's own size
   (`upsample_argmax`), then written as a palette PNG in the davis2017 results layout.

One jitted call per frame does steps 3-4 on the device, with the context kept on the device as a
ring buffer; the frames of a video are encoded in batches sharded over all devices. Then
`davis_metrics` scores the masks (J, F, J&F) and `run_davis` writes them with a markdown table.
"""

from __future__ import annotations

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stop_jax.data import batch as batch_lib
from stop_jax.eval import davis_data, davis_metrics, features, load
from stop_jax.runtime import fileio

LABEL_BUCKET = 8  # Label channels are padded to a multiple of this: fewer recompilations.


# ---------------------------------------------------------------------------------------------
# The math (pure functions).


def neighbourhood(grid: tuple[int, int], size: int) -> jax.Array:
  """bool [N, N]: key j is within `size` rows and columns of query i (all True for size 0)."""
  h, w = grid
  rows, cols = jnp.arange(h * w) // w, jnp.arange(h * w) % w
  if size <= 0:
    return jnp.ones((h * w, h * w), bool)
  near_rows = jnp.abs(rows[:, None] - rows[None, :]) <= size
  return near_rows & (jnp.abs(cols[:, None] - cols[None, :]) <= size)


def propagate(
  query: jax.Array,
  ctx_feats: jax.Array,
  ctx_labels: jax.Array,
  ctx_valid: jax.Array,
  grid: tuple[int, int],
  size: int,
  topk: int,
  temperature: float,
) -> jax.Array:
  """Soft labels of one frame from its context (DINO's `label_propagation`).

  Args:
    query: float [N, D] the frame's L2-normalised features (N = h * w of grid).
    ctx_feats: float [M, N, D] the context frames' normalised features.
    ctx_labels: float [M, N, C] their (soft) labels.
    ctx_valid: bool [M]; False for context slots not filled yet (no affinity).
    grid: (h, w) the token grid; size: the neighbourhood half-width (0 = everywhere).
    topk: keys kept per query; temperature: of exp(cos / temperature).

  Returns:
    float32 [N, C]: per query, the labels of its top-k keys weighted by their normalised affinity.
  """
  m, n, _ = ctx_feats.shape
  cos = jnp.einsum('qd,mkd->qmk', query.astype(jnp.float32), ctx_feats.astype(jnp.float32))
  allowed = neighbourhood(grid, size)[:, None, :] & ctx_valid[None, :, None]  # [N, M, N]
  # exp(cos / T) up to a per-query factor (the max allowed cosine), which the top-k selection
  # and the normalisation below cancel: the same weights as DINO's, without exp overflow at a
  # small temperature.
  top = jnp.max(jnp.where(allowed, cos, -jnp.inf), axis=(1, 2), keepdims=True)
  aff = jnp.where(allowed, jnp.exp((cos - top) / temperature), 0.0).reshape(n, m * n)
  kth = jax.lax.top_k(aff, min(topk, m * n))[0][:, -1:]  # [N, 1]
  aff = jnp.where(aff >= kth, aff, 0.0)  # ties with the k-th are kept, as in DINO
  aff = aff / jnp.sum(aff, axis=1, keepdims=True)
  return aff @ ctx_labels.reshape(m * n, -1).astype(jnp.float32)


def bilinear_matrix(in_size: int, factor: int) -> np.ndarray:
  """[in_size * factor, in_size] weights of torch's bilinear upsampling by an integer factor
  (align_corners=False: source coordinate (i + 0.5) / factor - 0.5, clamped at the borders)."""
  src = np.maximum((np.arange(in_size * factor) + 0.5) / factor - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(int), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((in_size * factor, in_size))
  np.add.at(m, (np.arange(len(src)), lo), 1 - frac)
  np.add.at(m, (np.arange(len(src)), hi), frac)
  return m


def upsample_argmax(soft: jax.Array, patch: int) -> jax.Array:
  """float [h, w, C] soft labels -> int32 [h * patch, w * patch] labels.

  Bilinear upsampling by the patch size; then each label's map is min-max normalised over the
  frame (a label with no mass stays 0), and the argmax picks the label (the lowest on a tie).
  """
  h, w, _ = soft.shape
  up_h = jnp.asarray(bilinear_matrix(h, patch), jnp.float32)
  up_w = jnp.asarray(bilinear_matrix(w, patch), jnp.float32)
  up = jnp.einsum('Hh,hwc,Ww->HWc', up_h, soft.astype(jnp.float32), up_w)
  lo, hi = up.min(axis=(0, 1)), up.max(axis=(0, 1))
  span = hi - lo
  # DINO divides by the span whenever the max is > 0; a label of constant positive mass (span 0)
  # would be NaN there, which wins torch's argmax: 1 everywhere does the same here.
  norm = jnp.where(span > 0, (up - lo) / jnp.where(span > 0, span, 1.0), jnp.where(hi > 0, 1.0, up))
  return jnp.argmax(norm, axis=-1).astype(jnp.int32)


def _step(state, query, slot, *, grid, size, topk, temperature, patch):
  """One frame: propagate, upsample, and write the frame into context slot `slot` (if any)."""
  feats, labels, valid = state
  soft = propagate(query, feats, labels, valid, grid, size, topk, temperature)  # [N, C]
  seg = upsample_argmax(soft.reshape(*grid, -1), patch).astype(jnp.uint8)
  if feats.shape[0] > 1:  # n_last_frames > 0: the frame joins the context
    feats = jax.lax.dynamic_update_index_in_dim(feats, query.astype(feats.dtype), slot, 0)
    labels = jax.lax.dynamic_update_index_in_dim(labels, soft, slot, 0)
    valid = jax.lax.dynamic_update_index_in_dim(valid, jnp.array(True), slot, 0)
  return (feats, labels, valid), seg


@functools.lru_cache(maxsize=8)
def _jitted_step(grid, size, topk, temperature, patch):
  fn = functools.partial(
    _step, grid=grid, size=size, topk=topk, temperature=temperature, patch=patch
  )
  # The context buffers are updated in place where the backend can (XLA:CPU cannot donate).
  return jax.jit(fn, donate_argnums=(0,) if jax.default_backend() != 'cpu' else ())


def propagate_video(
  feats: np.ndarray,
  first_labels: np.ndarray,
  grid: tuple[int, int],
  patch: int,
  n_last_frames: int = 7,
  size: int = 12,
  topk: int = 5,
  temperature: float = 0.1,
  device: jax.Device | None = None,
) -> np.ndarray:
  """Labels of frames 1..T-1 propagated from frame 0 (steps 3-4 of the module docstring).

  Args:
    feats: float [T, N, D] L2-normalised features of every frame (N = h * w of grid).
    first_labels: float [N, C] frame 0's one-hot labels at feature resolution.
    grid: (h, w); patch: the upsampling factor.
    device: where the jitted steps run (default: this process's first device).

  Returns:
    uint8 [T - 1, h * patch, w * patch] labels of frames 1..T-1.
  """
  t, n, d = feats.shape
  device = jax.local_devices()[0] if device is None else device
  m = 1 + n_last_frames
  ctx_feats = np.zeros((m, n, d), np.float32)
  ctx_feats[0] = feats[0]
  ctx_labels = np.zeros((m, n, first_labels.shape[1]), np.float32)
  ctx_labels[0] = first_labels
  valid = np.arange(m) == 0
  state = jax.device_put((ctx_feats, ctx_labels, valid), device)
  step = _jitted_step(tuple(grid), size, topk, float(temperature), patch)
  segs = []
  for i in range(1, t):  # dispatched back to back; fetched once at the end
    slot = 1 + (i - 1) % n_last_frames if n_last_frames else 0
    state, seg = step(state, jax.device_put(feats[i], device), np.int32(slot))
    segs.append(seg)
  if not segs:
    return np.zeros((0, grid[0] * patch, grid[1] * patch), np.uint8)
  return np.stack(jax.device_get(segs))


# ---------------------------------------------------------------------------------------------
# Features of the frames, on every device.


def frame_encoder(config: ml_collections.ConfigDict, encoder: nn.Module) -> nn.Module:
  """The encoder with the position table of `eval.davis_pos_embed` at any frame size."""
  if config.eval.davis_pos_embed == 'recompute':
    return encoder.clone(pos_embed_grid=None)
  g = config.model.image_size // config.model.patch_size
  return encoder.clone(pos_embed_grid=(g, g))


@functools.lru_cache(maxsize=8)
def _jitted_tokens(encoder: nn.Module, feature_types: tuple[str, ...], mesh):
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  def fn(params, images):
    variables = {'params': params}
    if 'last4' in feature_types:
      out, blocks = encoder.apply(variables, images, return_blocks=True)  # [L, B, N, D]
      last4 = blocks[-features.NUM_LAST_LAYERS :]  # oldest first, each after the final norm
      tokens = {'last': out, 'last4': jnp.concatenate(list(last4), axis=-1)}
    else:
      tokens = {'last': encoder.apply(variables, images)}  # [B, N, D]
    result = {}
    for t in feature_types:
      x = tokens[t].astype(jnp.float32)
      result[t] = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return result

  return jax.jit(fn, in_shardings=(replicated, rows), out_shardings=replicated)


def video_features(
  encoder: nn.Module,
  params,
  frame_paths: list[str],
  size: tuple[int, int],
  batch_size: int,
  feature_types: tuple[str, ...],
) -> dict[str, np.ndarray]:
  """{feature type: float32 [T, N, D] L2-normalised patch tokens} of a video's frames.

  Frames go through in global batches of batch_size (rounded up to the device count, the last
  one padded), each process reading only its rows.
  """
  mesh = features.data_mesh()
  global_batch = features.padded_batch_size(batch_size, mesh)
  local = global_batch // jax.process_count()
  mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  sharding = {'image': NamedSharding(mesh, P('data'))}
  fn = _jitted_tokens(encoder, tuple(feature_types), mesh)
  params = jax.device_put(nn.meta.unbox(params), NamedSharding(mesh, P()))
  out = {t: [] for t in feature_types}
  for start in range(0, len(frame_paths), global_batch):
    chunk = frame_paths[start : start + global_batch]
    images = np.zeros((local, *size, 3), np.float32)
    paths = chunk[mine]
    if paths:
      images[: len(paths)] = davis_data.read_frames(paths, size)
    tokens = fn(params, batch_lib.to_global({'image': images}, sharding)['image'])
    for t in feature_types:
      out[t].append(np.asarray(tokens[t])[: len(chunk)])
  return {t: np.concatenate(x) for t, x in out.items()}


# ---------------------------------------------------------------------------------------------
# The protocol.


def segment_video(
  config: ml_collections.ConfigDict, encoder: nn.Module, params, video: davis_data.Video
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """({feature type: uint8 [T, H, W] predicted labels}, palette [256, 3]) of one video.

  Frame 0's prediction is its given mask; H, W are the video's own frame size.
  """
  e, p = config.eval, config.model.patch_size
  first, palette = davis_data.read_mask(video.masks[0])
  height, width = first.shape
  size = davis_data.frame_size(height, width, e.davis_short_side, e.davis_long_multiple, p)
  grid = (size[0] // p, size[1] // p)
  num_labels = int(np.where(first == davis_data.VOID, 0, first).max()) + 1
  channels = math.ceil(num_labels / LABEL_BUCKET) * LABEL_BUCKET
  first_labels = davis_data.first_frame_labels(first, grid, channels)
  feats = video_features(
    encoder, params, list(video.frames), size, e.batch_size, tuple(e.feature_types)
  )
  preds = {}
  for t, f in feats.items():
    small = propagate_video(
      f,
      first_labels,
      grid,
      p,
      e.davis_n_last_frames,
      e.davis_size_mask_neighborhood,
      e.davis_topk,
      e.davis_temperature,
    )
    full = [davis_data.resize_nearest(s, (height, width)) for s in small]
    preds[t] = np.stack([first, *full]).astype(np.uint8)
  return preds, davis_data.default_palette() if palette is None else palette


def evaluate_videos(
  config: ml_collections.ConfigDict, encoder: nn.Module, params, out_dir: str
) -> tuple[dict[str, dict], dict]:
  """Propagates and scores every video of the config's split; writes masks under out_dir.

  Returns:
    ({feature type: the global scores of `davis_metrics.summarize`}, the rest of the record:
    'data', per-sequence and per-object tables, where the masks are).
  """
  e = config.eval
  videos = davis_data.list_videos(
    e.data_dir, e.davis_split, e.davis_resolution, tuple(e.davis_sequences)
  )
  encoder = frame_encoder(config, encoder)
  scores = {t: {} for t in e.feature_types}
  mask_dirs = {t: os.path.join(out_dir, t) for t in e.feature_types}
  for i, video in enumerate(videos):
    preds, palette = segment_video(config, encoder, params, video)
    gt = davis_data.read_masks(video.masks)
    for t, pred in preds.items():
      scores[t][video.name] = davis_metrics.video_scores(gt, pred, e.davis_bound_th)
      if jax.process_index() == 0:
        for path, labels in zip(video.frames, pred, strict=True):
          name = os.path.splitext(os.path.basename(path))[0] + '.png'
          davis_data.write_mask(os.path.join(mask_dirs[t], video.name, name), labels, palette)
    logging.info('davis [%d/%d] %s: %d frames', i + 1, len(videos), video.name, len(gt))
  summaries = {t: davis_metrics.summarize(s) for t, s in scores.items()}
  tables = ('per_sequence', 'per_object')
  results = {t: {k: v for k, v in s.items() if k not in tables} for t, s in summaries.items()}
  extra = {
    'data': {
      'root': e.data_dir,
      'split': e.davis_split,
      'resolution': e.davis_resolution,
      'sequences': [v.name for v in videos],
      'frames': sum(len(v.frames) for v in videos),
    },
    'davis': {t: {k: summaries[t][k] for k in tables} for t in summaries},
    'masks': {t: fileio.resolve(d) for t, d in mask_dirs.items()},
  }
  return results, extra


def markdown(record_name: str, results: dict, extra: dict) -> str:
  """The markdown tables of every feature type (`davis_metrics.markdown`)."""
  parts = []
  for t, res in results.items():
    parts.append(davis_metrics.markdown({**res, **extra['davis'][t]}, f'{record_name}: {t}'))
  return '\n'.join(parts)


def run_davis(task, encoder: nn.Module, params):
  """`python -m stop_jax.evaluate`'s runner (`evaluators.PROTOCOLS['davis']`).

  Masks go to WORKDIR/eval/<name>/<feature type>/<sequence>/*.png and the tables to
  WORKDIR/eval/<name>.md (the record, WORKDIR/eval/<name>.json, is written by `run.evaluate`).
  """
  if not task.model or not task.model.get('path'):
    raise ValueError('the davis protocol needs task.model["path"] (the workdir) for its masks.')
  name = load.result_name(task.config)
  eval_dir = os.path.join(task.model['path'], 'eval')
  results, extra = evaluate_videos(task.config, encoder, params, os.path.join(eval_dir, name))
  table = os.path.join(eval_dir, f'{name}.md')
  if jax.process_index() == 0:
    fileio.write_text(table, markdown(name, results, extra))
  extra['table'] = fileio.resolve(table)
  return results, extra
