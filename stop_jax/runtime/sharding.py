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

Multislice (several TPU slices joined over the data-center network, DCN): `mesh.dcn_data` and
`mesh.dcn_fsdp` say how many slices the data and fsdp axes span. The mesh then keeps its global
shape (data, fsdp, tensor) but is built by `create_hybrid_device_mesh`: each axis is cut into
`dcn` blocks of one slice each, so only the collectives of those axes cross the DCN, and the rest
(all of tensor, the within-slice part of data and fsdp) stay on the slice's ICI. The slices are
the devices' `slice_index`; devices without one (CPU, GPU) count each process as a slice.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import threading
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from stop_jax.runtime import cli

MESH_AXES = ('data', 'fsdp', 'tensor')
# The mesh axes that may span several slices, and the config keys giving how many. Tensor
# parallelism moves activations every layer: it stays inside a slice.
DCN_KEYS = {'data': 'dcn_data', 'fsdp': 'dcn_fsdp'}
_AUTO = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)

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


class MeshError(cli.UserError, ValueError):
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


def dcn_shape(config) -> tuple[int, int, int]:
  """(dcn_data, dcn_fsdp, 1): the number of slices each mesh axis spans (1 = inside a slice)."""
  out = []
  for axis in MESH_AXES:
    key = DCN_KEYS.get(axis)
    value = config.mesh[key] if key else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise MeshError(
        f'config.mesh.{key}={value!r} is not allowed: a positive number of slices that the '
        f'{axis} axis spans (1 = it stays inside each slice).'
      )
    out.append(value)
  return tuple(out)


def split_over_slices(
  config, num_devices: int, num_slices: int | None = None, slices_are: str = 'slices'
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """(per-slice shape, dcn shape) of the mesh: their product, axis by axis, is mesh_shape.

  Args:
    config: the config (reads config.mesh).
    num_devices: all devices of the mesh.
    num_slices: the slices those devices span, None to skip that check (config-only checks).
    slices_are: what a slice is here, for the error message (see `Slices.what`).
  Raises:
    MeshError naming the key, its value and what is allowed.
  """
  shape, dcn = mesh_shape(config, num_devices), dcn_shape(config)
  product = math.prod(dcn)
  if num_slices is not None and product != num_slices:
    raise MeshError(
      f'config.mesh.dcn_data x dcn_fsdp = {dcn[0]} x {dcn[1]} = {product} is not allowed: the '
      f'product must equal the number of slices, and the devices span {num_slices} '
      f'({slices_are}).'
    )
  for axis, size, d in zip(MESH_AXES, shape, dcn, strict=True):
    if size % d:
      raise MeshError(
        f'config.mesh.{DCN_KEYS[axis]}={d} is not allowed: it must divide mesh.{axis}={size} '
        f'(the {axis} axis is cut into {d} equal blocks, one per slice).'
      )
  return tuple(s // d for s, d in zip(shape, dcn, strict=True)), dcn


@dataclasses.dataclass(frozen=True)
class Slices:
  """The units of the slow network (DCN) that a set of devices spans.

  Attributes:
    count: how many.
    by_process: True where devices carry no slice_index (CPU, GPU): each process is a slice
      (`process_is_granule` of JAX's hybrid mesh).
    what: how they were counted, for messages.
  """

  count: int
  by_process: bool
  what: str


def find_slices(devices: Sequence[jax.Device]) -> Slices:
  """The slices `devices` span: distinct `slice_index` (TPU), else one per process."""
  if all(hasattr(d, 'slice_index') for d in devices):
    count = len({d.slice_index for d in devices})
    if devices[0].platform == 'tpu' or count > 1:
      return Slices(count, False, f'{count} distinct device.slice_index')
  count = len({d.process_index for d in devices})
  return Slices(
    count,
    True,
    f'{count} process(es): {devices[0].platform} devices have no slice_index, so each process '
    'counts as one slice',
  )


def _allow_split_physical_axes(devices) -> bool:
  # As jax.make_mesh: only v5e's 2-D torus may need a physical axis split between mesh axes.
  return devices[0].device_kind in ('TPU v5 lite', 'TPU v5e')


def device_array(config, devices: Sequence[jax.Device]) -> np.ndarray:
  """The devices arranged as the (data, fsdp, tensor) mesh, hybrid over several slices.

  One slice (or devices with no slice structure and dcn axes of 1): jax.make_mesh's order, so
  that the last axes (tensor, then fsdp) stay inside the fast interconnect of a host / slice.
  Several: `create_hybrid_device_mesh`, slice-major along each dcn axis.
  """
  slices = find_slices(devices)
  if math.prod(dcn_shape(config)) == 1 and (slices.by_process or slices.count == 1):
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=_AUTO, devices=devices).devices
  per_slice, dcn = split_over_slices(config, len(devices), slices.count, slices.what)
  attr = 'process_index' if slices.by_process else 'slice_index'
  sizes = collections.Counter(getattr(d, attr) for d in devices)
  if len(set(sizes.values())) > 1:
    raise MeshError(
      f'devices per slice ({attr}: count) {dict(sorted(sizes.items()))} are not allowed for '
      f'config.mesh.dcn_data x dcn_fsdp = {math.prod(dcn)}: a hybrid mesh needs equal slices.'
    )
  return mesh_utils.create_hybrid_device_mesh(
    per_slice,
    dcn,
    devices,
    process_is_granule=slices.by_process,
    allow_split_physical_axes=_allow_split_physical_axes(devices),
  )


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices, all hosts).

  Raises:
    MeshError when config.mesh does not fit the devices (count, slices), naming the key.
  """
  devices = jax.devices() if devices is None else list(devices)
  mesh = Mesh(device_array(config, devices), MESH_AXES, axis_types=_AUTO)
  dcn = dcn_shape(config)
  if math.prod(dcn) > 1:
    logging.info(
      'hybrid mesh %s over %s: dcn (slices) %s x per slice (ICI) %s',
      dict(mesh.shape),
      find_slices(devices).what,
      dict(zip(MESH_AXES, dcn, strict=True)),
      {a: mesh.shape[a] // d for a, d in zip(MESH_AXES, dcn, strict=True)},
    )
  return mesh


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all), slice by slice over TPU slices.

  For work split over examples only (feature extraction): over several slices, each slice holds
  a contiguous block of the axis, where jax.make_mesh refuses multi-slice devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  slices = find_slices(devices)
  n = len(devices)
  if slices.by_process or slices.count == 1:
    return jax.make_mesh((n,), ('data',), axis_types=_AUTO[:1], devices=devices)
  array = mesh_utils.create_hybrid_device_mesh(
    (n // slices.count,),
    (slices.count,),
    devices,
    allow_split_physical_axes=_allow_split_physical_axes(devices),
  )
  return Mesh(array, ('data',), axis_types=_AUTO[:1])


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
