"""Device mesh, logical axis names and the rules that map them onto the mesh.

Every parameter carries logical axis names (`nn.with_logical_partitioning` in the models), and
the models constrain their activations with `constrain(x, names)`. `RULES` maps those names to
mesh axes, so pure data parallel, FSDP, tensor parallel and their mixes are config changes:

  mesh.data=-1                     pure data parallel (params replicated, batch split);
  mesh.data=-1, mesh.fsdp=8        FSDP groups of 8: params, optimiser state and EMA target
                                   sharded along their 'embed' axis, batch split over both axes;
  mesh.data=-1, mesh.tensor=4      heads / MLP hidden units split over 4 devices (Megatron-style).

A logical axis whose size does not divide by its mesh axes' size stays unsharded on that dim
(e.g. a 3-channel patch kernel), rather than failing: XLA pads nothing and we log nothing, the
parameter is small. Only the big dims (widths, MLP, heads) are ever sharded.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axes. Params: 'embed' (model width), 'mlp' (hidden), 'heads' (q/k/v and
# attention-output features), 'layers' (the nn.scan axis). Activations: 'batch', 'length',
# 'act_embed', 'act_mlp', 'act_heads'. Activations keep their width whole under FSDP (the
# all-gathered weights multiply full-width activations); tensor parallel splits hidden units.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ('batch', ('data', 'fsdp')),
  ('embed', 'fsdp'),
  ('mlp', 'tensor'),
  ('heads', 'tensor'),
  ('layers', None),
  ('length', None),
  ('act_embed', None),
  ('act_mlp', 'tensor'),
  ('act_heads', 'tensor'),
)

# Logical names of the activations at block boundaries.
ACT_TOKENS = ('batch', 'length', 'act_embed')  # [B, N, D]
ACT_HIDDEN = ('batch', 'length', 'act_mlp')  # [B, N, M]


class MeshError(ValueError):
  """A mesh that cannot be built from the config and the devices; the message says why."""


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) from config.mesh, with at most one -1 meaning 'the rest'."""
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  given = dict(zip(MESH_AXES, sizes, strict=True))
  if sizes.count(-1) > 1:
    raise MeshError(f'config.mesh={given}: at most one axis may be -1 ("the rest").')
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f'config.mesh={given}: sizes must be positive or -1.')
  known = math.prod(s for s in sizes if s > 0)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(
        f'config.mesh={given}: {num_devices} devices do not divide by the fixed axes ({known}).'
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(
      f'config.mesh={given} needs {math.prod(sizes)} devices but {num_devices} are available '
      '(set one axis to -1 to take the rest).'
    )
  return tuple(sizes)


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices, all hosts).

  jax.make_mesh orders devices so that the last axes (tensor, then fsdp) stay inside the fast
  interconnect of a host / slice, where their collectives are most frequent.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
  )


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names, shape, mesh: Mesh, rules=RULES) -> P:
  """PartitionSpec for an array of `shape` whose dims carry logical `names`.

  Unknown names and dims that do not divide by their mesh axes' size stay unsharded; a mesh
  axis is used at most once per array (the first dim claiming it wins).
  """
  table = dict(rules)
  used, out = set(), []
  for name, size in zip(names, shape, strict=True):
    axes = table.get(name) if name is not None else None
    if axes is not None:
      tup = (axes,) if isinstance(axes, str) else tuple(axes)
      tup = tuple(a for a in tup if a not in used and mesh.shape[a] > 1)
      if not tup or size % _axis_size(mesh, tup):
        axes = None
      else:
        used.update(tup)
        axes = tup[0] if len(tup) == 1 else tup
    out.append(axes)
  return P(*out)


def tree_shardings(abstract_boxed, mesh: Mesh, rules=RULES):
  """NamedShardings for a tree (e.g. the abstract train state) whose leaves may be boxed.

  Leaves boxed in `nn.LogicallyPartitioned` get their rule-mapped spec; plain leaves (step,
  schedules' scalars) are replicated. The result has the structure of the *unboxed* tree.
  """

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      return NamedSharding(mesh, logical_to_spec(leaf.names, value.shape, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_spec(batch_axis: int, ndim: int) -> P:
  """Spec splitting dim `batch_axis` of an ndim array over the mesh's batch axes."""
  spec = [None] * ndim
  spec[batch_axis] = dict(RULES)['batch']
  return P(*spec)


# --- Activation constraints -------------------------------------------------------------------

_CONTEXT = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=RULES):
  """While tracing inside this context, `constrain` pins activations to the mesh."""
  previous = getattr(_CONTEXT, 'value', None)
  _CONTEXT.value = (mesh, rules)
  try:
    yield
  finally:
    _CONTEXT.value = previous


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op outside `activation_sharding`."""
  ctx = getattr(_CONTEXT, 'value', None)
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(
    x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules))
  )


# --- Reporting --------------------------------------------------------------------------------


def bytes_per_device(tree, shardings) -> int:
  """Largest per-device footprint of a tree of arrays / ShapeDtypeStructs under `shardings`."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    shard = sh.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total
