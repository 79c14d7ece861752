"""Paper Fig. 5: stochastic positions against the deterministic ones.

A stochastic masked-token position `m_j = A n_j + b + psi_j`, `n_j ~ N(0, sigma^2 I_{d_e})`,
compared with every fixed sin-cos position psi_k (`position_similarity_maps`): how well does the
query still point at its own patch j, for several sigma and for the learned A of a run
(`runs.Run.projection`) or a random one (`random_projection`)?
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from stop_jax.models.layers import INIT

METRICS = ('cosine', 'dot')


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
