"""`shapes`: a procedural CLEVR-like dataset, rendered deterministically, with no download.

Each example is a scene drawn from (seed, split, index) alone: 3 to 10 objects (circles,
squares, triangles) of 8 colours and varied sizes, standing at random depths on a textured
ground under a textured sky. Depth sets where an object stands (farther: higher in the image,
like a camera looking down at a table), how large it looks and how dark it is; objects are drawn
far to near, so near ones occlude far ones. Images render at any resolution (2x supersampled,
then averaged: smooth edges), so the same scene can be pretrained on at 32 px and probed at 224.

Labels, the VTAB-style tasks the paper's CLEVR rows use (Table 4):
- `count`: the number of objects minus 3 (8 classes, as VTAB's clevr_count: 3..10 objects);
- `dist`: the depth bin of the nearest object (VTAB's clevr_distance uses 6 bins of the nearest
  object's distance). The nearest of several objects is usually near, so the 6 bins are sixths of
  that depth's distribution (`nearest_depth_cdf`), not of the depth range: balanced classes;
- `shape`: the shape of the object that looks largest (3 classes).

Splits ('train', 'test', or any name) are separate random streams of any size: example i of a
split is the same scene whatever else is read.
"""

from __future__ import annotations

import os
import threading
import zlib

import numpy as np
import tensorflow as tf

SHAPES = ('circle', 'square', 'triangle')
# CLEVR's eight colours (RGB in [0, 1]).
COLOURS = np.array(
  [
    [0.34, 0.34, 0.34],  # gray
    [0.68, 0.13, 0.13],  # red
    [0.16, 0.29, 0.84],  # blue
    [0.11, 0.41, 0.08],  # green
    [0.51, 0.29, 0.10],  # brown
    [0.51, 0.15, 0.75],  # purple
    [0.16, 0.82, 0.82],  # cyan
    [1.00, 0.93, 0.20],  # yellow
  ],
  np.float32,
)
NUM_OBJECTS = (3, 10)  # inclusive
NUM_DIST_BINS = 6
LABELS = {'count': NUM_OBJECTS[1] - NUM_OBJECTS[0] + 1, 'dist': NUM_DIST_BINS, 'shape': len(SHAPES)}
DEFAULT_EXAMPLES = {'train': 50_000, 'test': 5_000}
# The scenes are the same for every run (a dataset, not a draw): config.seed does not move them.
DATASET_SEED = 0
TASKS = tuple(LABELS)  # the order of tf_example's labels
_HORIZON = 0.3  # the ground starts this far down the image


def _split_id(split: str) -> int:
  return zlib.crc32(split.encode('utf-8'))


def scene(seed: int, split: str, index: int) -> dict[str, np.ndarray]:
  """The scene of one example: per object shape, colour, x (0..1), depth (0 near .. 1 far),
  size (the apparent half-width as a fraction of the image), and the background's parameters."""
  rng = np.random.default_rng([int(seed), _split_id(split), int(index)])
  n = int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))
  depth = rng.uniform(0.0, 1.0, n)
  base = rng.uniform(0.05, 0.10, n)  # small to large objects
  return {
    'shape': rng.integers(0, len(SHAPES), n),
    'colour': rng.integers(0, len(COLOURS), n),
    'x': rng.uniform(0.08, 0.92, n),
    'depth': depth,
    'size': base * (1.4 - 0.8 * depth),  # farther objects look smaller
    'angle': rng.uniform(0.0, np.pi, n),  # squares and triangles are turned
    'sky': rng.uniform(0.55, 0.95, 3),
    'ground': rng.uniform(0.25, 0.6, 3),
    'texture': rng.uniform(0.0, 1.0, 6),  # stripe frequencies, orientations and phases
  }


def nearest_depth_cdf(z: float) -> float:
  """P(nearest depth <= z): n uniform in 3..10 objects at depths uniform in [0, 1]."""
  counts = np.arange(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1)
  return float(1.0 - np.mean((1.0 - z) ** counts))


def labels(s: dict[str, np.ndarray]) -> dict[str, int]:
  """The three labels of a scene (see the module docstring)."""
  nearest = float(np.min(s['depth']))
  return {
    'count': len(s['shape']) - NUM_OBJECTS[0],
    'dist': min(int(nearest_depth_cdf(nearest) * NUM_DIST_BINS), NUM_DIST_BINS - 1),
    'shape': int(s['shape'][int(np.argmax(s['size']))]),
  }


def _background(s, yy, xx) -> np.ndarray:
  """Sky above the horizon, ground below, each with faint stripes: [H, W, 3]."""
  t = s['texture']
  stripes_sky = 0.06 * np.sin(2 * np.pi * (3 + 6 * t[0]) * (xx * np.cos(t[1] * np.pi) + yy * np.sin(t[1] * np.pi)) + 6.3 * t[2])  # fmt: skip
  # The ground's stripes get denser towards the horizon (perspective).
  ground_y = np.maximum(yy - _HORIZON, 1e-3)
  stripes_ground = 0.08 * np.sin(
    2 * np.pi * (2 + 4 * t[3]) * (xx - 0.5) / ground_y * 0.3 + 6.3 * t[4]
  )
  stripes_ground *= 0.5 + 0.5 * np.sin(2 * np.pi * (4 + 8 * t[5]) * np.log(ground_y))
  sky = s['sky'][None, None] * (1.0 - 0.25 * yy[..., None]) + stripes_sky[..., None]
  ground = s['ground'][None, None] * (0.7 + 0.5 * yy[..., None]) + stripes_ground[..., None]
  return np.where((yy < _HORIZON)[..., None], sky, ground)


def _object_mask(shape: int, cx, cy, r, angle, yy, xx) -> np.ndarray:
  """bool [H, W]: the pixels of one object centred at (cx, cy) with half-width r."""
  dx, dy = xx - cx, yy - cy
  if SHAPES[shape] == 'circle':
    return dx * dx + dy * dy <= r * r
  c, s = np.cos(angle), np.sin(angle)
  u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
  if SHAPES[shape] == 'square':
    side = r * 0.85
    return (np.abs(u) <= side) & (np.abs(v) <= side)
  # An equilateral triangle of circumradius r: inside all three half-planes.
  inside = np.ones_like(u, bool)
  for k in range(3):
    a = angle + 2 * np.pi * k / 3
    inside &= (np.cos(a) * dx + np.sin(a) * dy) <= r * 0.5
  return inside


def render(s: dict[str, np.ndarray], size: int) -> np.ndarray:
  """The scene as uint8 [size, size, 3]."""
  big = 2 * size
  coords = (np.arange(big, dtype=np.float32) + 0.5) / big
  yy, xx = np.meshgrid(coords, coords, indexing='ij')
  image = _background(s, yy, xx)
  for i in np.argsort(-s['depth'], kind='stable'):  # far first: near objects occlude
    r = float(s['size'][i])
    cy = _HORIZON + 0.05 + (1.0 - float(s['depth'][i])) * (0.9 - _HORIZON - 0.05)
    mask = _object_mask(int(s['shape'][i]), float(s['x'][i]), cy, r, float(s['angle'][i]), yy, xx)
    # Lit from above: brighter at the top of the object; farther objects are dimmer.
    shade = (1.1 - 0.4 * np.clip((yy - (cy - r)) / (2 * r), 0, 1)) * (1.0 - 0.35 * s['depth'][i])
    colour = COLOURS[s['colour'][i]][None, None] * shade[..., None]
    image = np.where(mask[..., None], colour, image)
  image = image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
  return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def example(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, dict[str, int]]:
  """(uint8 [size, size, 3], {'count', 'dist', 'shape'}) of example `index` of a split."""
  s = scene(seed, split, index)
  return render(s, size), labels(s)


def batch(seed: int, split: str, indices, size: int, label: str) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [N, size, size, 3] images and int32 [N] labels of one task (count | dist | shape)."""
  if label not in LABELS:
    raise ValueError(f'shapes label {label!r} is not allowed: one of {tuple(LABELS)}.')
  images, ys = [], []
  for i in indices:
    image, y = example(seed, split, int(i), size)
    images.append(image)
    ys.append(y[label])
  return np.stack(images), np.asarray(ys, np.int32)


# --- readers --------------------------------------------------------------------------------


def split_size(split: str, max_examples: int = -1) -> int:
  """Examples of a split: max_examples if > 0 (a split has any size), else DEFAULT_EXAMPLES
  (the test split's size for other split names)."""
  if max_examples > 0:
    return int(max_examples)
  return DEFAULT_EXAMPLES.get(split, DEFAULT_EXAMPLES['test'])


# Rendered scenes kept in memory, so later epochs and the probes' reads of the same scenes cost
# nothing (rendering is the slow part of a small run). Bounded: past the budget, scenes are
# rendered again on every read. With STOP_JAX_SHAPES_CACHE=DIR, scenes are also kept on disk in
# chunks of CHUNK consecutive scenes, shared by every process and run (the same bytes as
# rendering: `render` is deterministic).
_MEMO: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}
_MEMO_BYTES = 1 << 30
CHUNK = 500
CACHE_ENV = 'STOP_JAX_SHAPES_CACHE'


_LOCKS: dict[tuple[str, int, int], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _chunk_lock(key) -> threading.Lock:
  with _LOCKS_GUARD:
    return _LOCKS.setdefault(key, threading.Lock())


def _render_labelled(split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  image, y = example(DATASET_SEED, split, index, size)
  return image, np.asarray([y[t] for t in TASKS], np.int32)


def _disk_chunk(cache_dir: str, split: str, chunk: int, size: int):
  """(uint8 [CHUNK, size, size, 3], int32 [CHUNK, 3]) of scenes chunk * CHUNK onwards, read
  from the cache directory or rendered and written there (atomically: concurrent writers
  each write the same bytes)."""
  name = f'shapes-s{DATASET_SEED}-{_split_id(split):08x}-{size}px-{chunk * CHUNK}.npz'
  path = os.path.join(cache_dir, name)
  if os.path.exists(path):
    with np.load(path) as data:
      return data['images'], data['labels']
  rendered = [_render_labelled(split, chunk * CHUNK + i, size) for i in range(CHUNK)]
  images = np.stack([r[0] for r in rendered])
  labels = np.stack([r[1] for r in rendered])
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}-{threading.get_ident()}'
  with open(tmp, 'wb') as f:
    np.savez(f, images=images, labels=labels)
  os.replace(tmp, path)
  return images, labels


def _rendered(split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [size, size, 3], int32 [3] labels in TASKS order) of one scene, memoised."""
  key = (split, index, size)
  hit = _MEMO.get(key)
  if hit is not None:
    return hit
  cache_dir = os.environ.get(CACHE_ENV)
  if not cache_dir:
    out = _render_labelled(split, index, size)
    if (len(_MEMO) + 1) * out[0].nbytes <= _MEMO_BYTES:
      _MEMO[key] = out
    return out
  chunk = index // CHUNK
  with _chunk_lock((split, chunk, size)):  # one thread renders or reads a chunk
    hit = _MEMO.get(key)
    if hit is not None:
      return hit
    images, labels = _disk_chunk(cache_dir, split, chunk, size)
  for i in range(CHUNK):
    if (len(_MEMO) + 1) * images[i].nbytes > _MEMO_BYTES:
      break
    _MEMO[(split, chunk * CHUNK + i, size)] = (images[i], labels[i])
  return images[index - chunk * CHUNK], labels[index - chunk * CHUNK]


def tf_example(split: str, index, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(image float32 [size, size, 3] in [0, 1], int32 [3] labels in TASKS order) of scene
  `index` of the dataset (DATASET_SEED), rendered by numpy inside a TF pipeline."""

  def render_one(i):
    return _rendered(split, int(i), size)

  image, labels = tf.numpy_function(render_one, [index], (tf.uint8, tf.int32), stateful=False)
  image = tf.ensure_shape(image, [size, size, 3])
  return tf.cast(image, tf.float32) / 255.0, tf.ensure_shape(labels, [len(TASKS)])
