"""Frozen-encoder features for the probes: pooled, batched, sharded over devices, cached.

Two feature types, as in the StoP / I-JEPA evaluations (VISSL protocol):

- `last`: the average over tokens of the encoder output, i.e. of the last block after the
  encoder's final LayerNorm. [N, D].
- `last4`: the concatenation, oldest block first, of the token averages of the last 4 blocks,
  each passed through the encoder's final LayerNorm. [N, 4D]. The papers do not say which norm
  the intermediate blocks get; we follow the common ViT convention (DINO's
  `get_intermediate_layers`, used by its linear eval with `n_last_blocks=4`): the final norm on
  every one of them. The last quarter of `last4` is therefore `last` (up to float rounding).

Extraction is one jitted function with one static batch shape (the last batch is padded), the
batch sharded over a 1-D 'data' mesh of all devices and the params replicated. Features are
cached as npz files keyed by a hash of everything they depend on, so a second evaluation of the
same checkpoint on the same data reads them back instead of re-running the encoder (the cache
directory may be local or an object store: `runtime/fileio.py`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stop_jax import config as config_lib
from stop_jax.data import batch as batch_lib
from stop_jax.runtime import fileio, sharding

FEATURE_TYPES = config_lib.FEATURE_TYPES
NUM_LAST_LAYERS = 4
CACHE_VERSION = 1  # Bump when the feature computation changes, so old cache files are ignored.


def check_feature_types(feature_types: Sequence[str], depth: int) -> tuple[str, ...]:
  """Returns feature_types as a tuple; raises ValueError naming a bad one."""
  feature_types = tuple(feature_types)
  for t in feature_types:
    if t not in FEATURE_TYPES:
      raise ValueError(f'feature type {t!r} is not allowed: one of {FEATURE_TYPES}.')
  if 'last4' in feature_types and depth < NUM_LAST_LAYERS:
    raise ValueError(f"feature type 'last4' needs an encoder of depth >= 4, this one has {depth}.")
  if not feature_types:
    raise ValueError(f'no feature type given: choose from {FEATURE_TYPES}.')
  return feature_types


def feature_dim(feature_type: str, width: int) -> int:
  """Width of a feature type for an encoder of width D: D for last, 4D for last4."""
  return width * (NUM_LAST_LAYERS if feature_type == 'last4' else 1)


def pooled_features(
  encoder: nn.Module, params, images: jax.Array, feature_types: Sequence[str] = FEATURE_TYPES
) -> dict[str, jax.Array]:
  """Average-pooled features of a frozen encoder (pure; see the module docstring).

  Args:
    encoder: a VisionTransformer.
    params: its params (plain arrays).
    images: normalised [B, H, W, 3].
    feature_types: any of 'last' ([B, D]) and 'last4' ([B, 4D]).

  Returns:
    {feature_type: float32 [B, dim]}.
  """
  feature_types = check_feature_types(feature_types, encoder.depth)
  variables = {'params': params}
  if 'last4' not in feature_types:
    out = encoder.apply(variables, images)  # [B, N, D]
    return {'last': jnp.mean(out.astype(jnp.float32), axis=1)}
  out, blocks = encoder.apply(variables, images, return_blocks=True)  # [B,N,D], [L,B,N,D]
  pooled = jnp.mean(blocks[-NUM_LAST_LAYERS:].astype(jnp.float32), axis=2)  # [4, B, D]
  result = {'last4': jnp.concatenate(list(pooled), axis=-1)}  # [B, 4D], oldest block first
  if 'last' in feature_types:
    result['last'] = jnp.mean(out.astype(jnp.float32), axis=1)  # [B, D]
  return result


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over every device of every process (and slice: multislice too)."""
  return sharding.data_mesh()


def padded_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """batch_size rounded up to a multiple of the mesh size (and so of the process count)."""
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be > 0.')
  n = mesh.size
  return math.ceil(batch_size / n) * n


@functools.lru_cache(maxsize=16)
def _jitted_extract(encoder: nn.Module, feature_types: tuple[str, ...], mesh):
  """One jitted extraction per (encoder, types, mesh): a periodic k-NN during pretraining builds
  a new FeatureExtractor every time, and must hit the compilation cache instead of recompiling."""
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P('data'))

  def fn(params, images, labels, valid):
    return pooled_features(encoder, params, images, feature_types), labels, valid

  return jax.jit(fn, in_shardings=(replicated, batch, batch, batch), out_shardings=replicated)


class FeatureExtractor:
  """The jitted, sharded `pooled_features` for a fixed global batch size.

  Call it with this process's rows of a global batch; it returns the pooled features, labels
  and validity flags of the whole global batch on every process (replicated output), so the
  probes can run anywhere.
  """

  def __init__(
    self,
    encoder: nn.Module,
    params,
    global_batch: int,
    feature_types: Sequence[str] = FEATURE_TYPES,
    mesh: jax.sharding.Mesh | None = None,
  ):
    self.mesh = data_mesh() if mesh is None else mesh
    self.feature_types = check_feature_types(feature_types, encoder.depth)
    self.global_batch = padded_batch_size(global_batch, self.mesh)
    self.local_batch = self.global_batch // jax.process_count()
    self.batch_sharding = NamedSharding(self.mesh, P('data'))
    self._shardings = dict.fromkeys(('image', 'label', 'valid'), self.batch_sharding)
    self.params = jax.device_put(nn.meta.unbox(params), NamedSharding(self.mesh, P()))
    self._fn = _jitted_extract(encoder, self.feature_types, self.mesh)

  def __call__(self, images: np.ndarray, labels: np.ndarray | None = None, valid=None):
    """This process's rows (at most local_batch of them) -> the global batch's features.

    Args:
      images: float [b, H, W, 3], b <= local_batch; padded here.
      labels: optional int [b].
      valid: optional bool [b] (rows already padded by the data stream).

    Returns:
      ({feature_type: np.float32 [G, dim]}, labels int32 [G], valid bool [G]) with G the
      global batch, process-major order.
    """
    return self.fetch(self.dispatch(images, labels, valid))

  def dispatch(self, images: np.ndarray, labels: np.ndarray | None = None, valid=None):
    """`__call__` without waiting: the jitted extraction's device arrays, still computing."""
    b = len(images)
    if b > self.local_batch:
      raise ValueError(f'{b} rows exceed the local batch of {self.local_batch}.')
    pad = self.local_batch - b
    labels = np.zeros((b,), np.int32) if labels is None else np.asarray(labels, np.int32)
    valid = np.ones((b,), bool) if valid is None else np.asarray(valid, bool)
    images = np.asarray(images, np.float32)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
      labels = np.concatenate([labels, np.zeros((pad,), np.int32)])
      valid = np.concatenate([valid, np.zeros((pad,), bool)])
    batch = batch_lib.to_global({'image': images, 'label': labels, 'valid': valid}, self._shardings)
    out = self._fn(self.params, batch['image'], batch['label'], batch['valid'])
    for x in jax.tree.leaves(out):
      x.copy_to_host_async()  # the copy starts as soon as the batch is done, not when fetched
    return out

  @staticmethod
  def fetch(dispatched):
    """Waits for `dispatch`'s result and brings it to the host, as `__call__` returns it."""
    feats, labels, valid = dispatched
    return {k: np.asarray(v) for k, v in feats.items()}, np.asarray(labels), np.asarray(valid)


def extract_from_batches(
  extractor: FeatureExtractor, batches: Iterable[dict]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Runs a stream of local batches ({'image', 'label', optional 'valid'}) through extractor.

  One batch stays in flight: batch i + 1 is read and dispatched before batch i's features are
  fetched, so the input pipeline and the host copy overlap the accelerator's work. The stream
  must therefore hand out fresh arrays, not refill one buffer (on CPU a dispatched batch may still
  read the caller's memory while the next one is produced).

  Returns:
    ({feature_type: float32 [N, dim]}, int32 labels [N]) over the valid rows of all processes.
  """
  feats = {t: [] for t in extractor.feature_types}
  labels = []

  def keep(dispatched):
    f, y, v = extractor.fetch(dispatched)
    for t in feats:
      feats[t].append(f[t][v])
    labels.append(y[v])

  pending = None
  for batch in batches:
    dispatched = extractor.dispatch(batch['image'], batch.get('label'), batch.get('valid'))
    if pending is not None:
      keep(pending)
    pending = dispatched
  if pending is None:
    raise ValueError('no batches to extract features from.')
  keep(pending)
  return {t: np.concatenate(x) for t, x in feats.items()}, np.concatenate(labels)


def extract_from_arrays(
  encoder: nn.Module,
  params,
  images: np.ndarray,
  batch_size: int = 256,
  feature_types: Sequence[str] = FEATURE_TYPES,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, np.ndarray]:
  """Features of in-memory images [N, H, W, 3] that every process holds in full.

  Each global batch of `batch_size` (rounded up to the device count) is split among the
  processes; the last one is padded.

  Returns:
    {feature_type: float32 [N, dim]}.
  """
  ex = FeatureExtractor(encoder, params, batch_size, feature_types, mesh)
  rows = slice(jax.process_index() * ex.local_batch, (jax.process_index() + 1) * ex.local_batch)

  def batches():
    for i in range(0, len(images), ex.global_batch):
      chunk = images[i : i + ex.global_batch]
      yield {'image': chunk[rows], 'valid': np.ones((len(chunk[rows]),), bool)}

  feats, _ = extract_from_batches(ex, batches())
  return feats


def encoder_features(encoder, params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Average-pooled last-layer features (the trainer's probe). [N, H, W, 3] -> [N, D]."""
  return extract_from_arrays(encoder, params, images, batch_size, ('last',))['last']


# ---------------------------------------------------------------------------------------------
# Disk cache.


def params_fingerprint(params) -> str:
  """A hash of every leaf's path, dtype, shape and bytes: retrained weights never hit a stale
  cache entry even if the step and config are unchanged."""
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)):
    x = np.asarray(jax.device_get(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}'.encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def cache_file(cache_dir: str, key: dict) -> str:
  """<cache_dir>/<hash of key>.npz; key must be JSON-serialisable (values via str otherwise)."""
  text = json.dumps(key, sort_keys=True, default=str)
  return os.path.join(cache_dir, hashlib.sha256(text.encode()).hexdigest()[:24] + '.npz')


def _write_npz(path: str, **arrays):
  """Atomic: a reader never sees a half-written file (`fileio.write_bytes`)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  fileio.write_bytes(path, buffer.getbuffer())


def cached_features(
  cache_dir: str | None,
  key: dict,
  feature_types: Sequence[str],
  compute: Callable[[tuple[str, ...]], tuple[dict[str, np.ndarray], np.ndarray]],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Features per type from the cache, computing only the missing types (in one pass).

  Args:
    cache_dir: directory of npz files; None disables the cache.
    key: what the features depend on (model identity, model config, data spec); each type's
      file is keyed by `{**key, 'feature_type': t}`.
    feature_types: wanted types.
    compute: missing types -> ({type: [N, dim]}, labels [N]).

  Returns:
    ({type: float32 [N, dim]}, int32 labels [N]).
  """
  feature_types = tuple(feature_types)
  if cache_dir is None:
    return compute(feature_types)
  keys = {t: {**key, 'feature_type': t} for t in feature_types}
  files = {t: cache_file(cache_dir, keys[t]) for t in feature_types}
  feats, labels = {}, None
  for t, path in files.items():
    if fileio.exists(path):
      with np.load(io.BytesIO(fileio.read_bytes(path))) as data:
        feats[t], labels = data['features'], data['labels']
      logging.info('features %s: read from cache %s', t, path)
  missing = tuple(t for t in feature_types if t not in feats)
  if missing:
    new, new_labels = compute(missing)
    if labels is not None and not np.array_equal(labels, new_labels):
      raise RuntimeError(f'cached labels in {cache_dir} disagree with fresh ones: clear it.')
    labels = new_labels
    for t in missing:
      feats[t] = new[t]
      if jax.process_index() == 0:
        _write_npz(files[t], features=new[t], labels=labels, key=json.dumps(keys[t], default=str))
  return {t: feats[t] for t in feature_types}, labels
