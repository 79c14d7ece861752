"""The pretraining batch, declared once: its keys, shapes, dtypes and batch axes.

A batch is a dict of arrays. `LAYOUT` is the one description of it; the shardings, the abstract
batch for ahead-of-time compilation and the host -> device conversion are all derived from it.
  image      float32 [B, S, S, 3]   normalised pixels
  ctx_idx    int32   [B, Kc]        context token indices (raster order)
  ctx_valid  bool    [B, Kc]        False for padded context slots
  tgt_idx    int32   [n, B, Kt]     target token indices of each of the n target blocks
  tgt_valid  bool    [n, B, Kt]     False for padded target slots
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from stop_jax.data import masking
from stop_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class Field:
  """One array of the batch: its dtype, its axes (by name) and which of them is the batch."""

  dtype: object
  axes: tuple[str, ...]

  @property
  def batch_axis(self) -> int:
    return self.axes.index('batch')


LAYOUT = {
  'image': Field(jnp.float32, ('batch', 'height', 'width', 'rgb')),
  'ctx_idx': Field(jnp.int32, ('batch', 'context')),
  'ctx_valid': Field(jnp.bool_, ('batch', 'context')),
  'tgt_idx': Field(jnp.int32, ('targets', 'batch', 'target')),
  'tgt_valid': Field(jnp.bool_, ('targets', 'batch', 'target')),
}


def shapes(global_batch: int, image_size: int, mask_spec: masking.MaskSpec) -> dict[str, tuple]:
  """The global shape of every array of the batch."""
  size = {
    'batch': global_batch,
    'height': image_size,
    'width': image_size,
    'rgb': 3,
    'context': mask_spec.num_context_tokens,
    'targets': mask_spec.num_targets,
    'target': mask_spec.num_target_tokens,
  }
  return {k: tuple(size[a] for a in f.axes) for k, f in LAYOUT.items()}


def batch_shardings(mesh) -> dict[str, NamedSharding]:
  """Every array split over the mesh's batch axes along its own batch axis."""
  return {
    k: NamedSharding(mesh, sharding.batch_spec(f.batch_axis, len(f.axes)))
    for k, f in LAYOUT.items()
  }


def abstract_batch(config, mask_spec: masking.MaskSpec, shardings: dict) -> dict:
  """ShapeDtypeStructs of one global batch (for ahead-of-time compilation)."""
  sizes = shapes(config.data.global_batch_size, config.model.image_size, mask_spec)
  return {
    k: jax.ShapeDtypeStruct(sizes[k], f.dtype, sharding=shardings[k]) for k, f in LAYOUT.items()
  }


def to_global(local: dict, shardings: dict) -> dict:
  """This process's share of a batch -> one global jax.Array per key.

  Works for any dict of per-process arrays (pretraining batches, evaluation batches): each
  array becomes `jax.make_array_from_process_local_data(shardings[key], array)`.
  """
  missing = sorted(set(local) - set(shardings))
  if missing:
    raise KeyError(
      f'to_global: no sharding for batch key(s) {missing}; shardings has {sorted(shardings)}.'
    )
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()
  }
