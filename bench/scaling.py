r"""Weak-scaling estimate on paper, from the collectives in the compiled step's HLO.

    python bench/scaling.py                                 # ViT-H/14, DP and FSDP, 64 devices
    python bench/scaling.py --config=configs/vitl16.py --per_device_batch=32

For each mesh (pure data parallel, full FSDP, and 8-way FSDP x data), compiles the trainer's
real sharded step for `--num_devices` simulated CPU devices with unrolled blocks at two small
depths, reads every collective from the optimised HLO (all-reduce, all-gather, reduce-scatter,
all-to-all, collective-permute; async `-start` ops counted once), and turns its result shape
and replica-group size into the bytes each device sends over a ring:

  all-gather       (n-1)/n x result          reduce-scatter  (n-1) x result
  all-reduce       2 (n-1)/n x size          all-to-all      (n-1)/n x size
  collective-permute  size

Collective bytes are affine in depth, so the two depths extrapolate exactly to the real depth
(cheaper than compiling 32 unrolled blocks). The predicted step time compares those bytes, at
the assumed per-device bandwidth, with the compute time of the analytic useful FLOPs
(bench/train_step.model_flops, plus the recomputation the remat policy adds) at an assumed
MFU of the bf16 datasheet peak:

  efficiency (overlapped)  = t_compute / max(t_compute, t_comm)   (XLA's async collectives and
                             latency-hiding scheduler overlap FSDP gathers with compute)
  efficiency (serial)      = t_compute / (t_compute + t_comm)    (no overlap at all: a floor)

Bandwidth assumptions (per device, one direction; printed with the result):
  TPU v5p: 3D-torus ICI, 4,800 Gbit/s per chip = 600 GB/s in total; we assume 200 GB/s usable by
    one ring collective (one torus dimension, both directions), bf16 peak 459 TFLOP/s.
  H100 SXM: NVLink 450 GB/s per direction inside a node of 8; between nodes InfiniBand NDR,
    400 Gbit/s = 50 GB/s per GPU, with NCCL's hierarchical algorithms sending 1/8 of each tensor
    over each GPU's NIC (bf16 peak 989 TFLOP/s).
XLA:CPU lowers FSDP's gradient reduction as all-reduce + dynamic-slice, which the GPU and TPU
pipelines rewrite into a reduce-scatter: on a pure FSDP mesh all-reduce bytes count once; on a
mesh with a data axis too they count twice (an upper bound; see `ring_factor`).
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stop_jax.runtime import host_devices  # noqa: E402

if __name__ == '__main__':
  host_devices.simulate_from_argv(sys.argv, default=64)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import collections  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

_DTYPE_BYTES = {'bf16': 2, 'f16': 2, 'f32': 4, 'f64': 8, 's32': 4, 'u32': 4, 's8': 1, 'u8': 1}
_DTYPE_BYTES.update({'pred': 1, 's64': 8, 'u64': 8})
_COLLECTIVE = re.compile(
  r'=\s*(?P<shape>\([^()]*\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+'
  r'(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\('
)
_ARRAY = re.compile(r'([a-z]+[0-9]*)\[([0-9,]*)\]')
_IOTA_GROUPS = re.compile(r'replica_groups=\[(\d+),(\d+)\]<=')
_LIST_GROUPS = re.compile(r'replica_groups=\{\{([0-9,]*)\}')
# Newer XLA prints mesh-style groups: replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}.
_MESH_GROUPS = re.compile(r'replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}')

# Per device. TPU v5p: a slice's ICI is the one network (devices_per_node = the slice).
TARGETS = (
  {
    'name': '256 x TPU v5p',
    'peak_tflops': 459.0,
    'devices': 256,
    'devices_per_node': 256,
    'intra_gb_s': 200.0,
    'inter_gb_s': 200.0,
  },
  {
    'name': '64 x H100 SXM (8 nodes of 8)',
    'peak_tflops': 989.0,
    'devices': 64,
    'devices_per_node': 8,
    'intra_gb_s': 450.0,
    'inter_gb_s': 50.0,
  },
)


def _bytes_of(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = int(np.prod([int(d) for d in dims.split(',') if d])) if dims else 1
    total += size * _DTYPE_BYTES.get(dtype, 4)
  return total


def _group_size(line: str, default: int) -> int:
  m = _MESH_GROUPS.search(line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    axes = re.findall(r"'(\w+)'", m.group(2))
    return int(np.prod([int(sizes[a]) for a in axes])) if axes else 1
  m = _IOTA_GROUPS.search(line)
  if m:
    return int(m.group(2))
  m = _LIST_GROUPS.search(line)
  if m:
    return len([x for x in m.group(1).split(',') if x])
  return default


def collectives(hlo_text: str, num_devices: int) -> list[tuple[str, int, int]]:
  """(op, group size n, full tensor bytes S) for every collective in optimised HLO text.

  S is the unsharded size the collective moves: the all-gather's result, n x the
  reduce-scatter's result, the all-reduce's operand.
  """
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m or '-done' in line.split('=')[0]:
      continue
    op, size = m.group('op'), _bytes_of(m.group('shape'))
    n = _group_size(line, num_devices)
    if n > 1:
      out.append((op, n, size * n if op == 'reduce-scatter' else size))
  return out


def ring_factor(op: str, full_fsdp: bool) -> float:
  """Multiples of (n-1)/n x S each device sends in a ring implementation of `op`.

  XLA:CPU lowers FSDP's gradient reduction as all-reduce + dynamic-slice; the GPU and TPU
  pipelines rewrite that pair into a reduce-scatter, so on a pure FSDP mesh an all-reduce counts
  once. With a data axis too, some all-reduces are real ones (across data) and the HLO's group
  sizes cannot tell them apart when data == fsdp: all count twice there (an upper bound).
  """
  if op != 'all-reduce':
    return 1.0
  return 1.0 if full_fsdp else 2.0


def collective_bytes(records, full_fsdp: bool) -> dict[str, float]:
  """Bytes each device sends per step by kind (ring algorithms)."""
  out: dict[str, float] = {}
  for op, n, size in records:
    out[op] = out.get(op, 0.0) + ring_factor(op, full_fsdp) * (n - 1) / n * size
  return out


def comm_seconds(records, full_fsdp: bool, target: dict) -> float:
  """Time of the step's collectives on `target`, one after the other (no overlap).

  One bandwidth inside a node (or a whole TPU slice); across nodes NCCL's hierarchical
  algorithms send only 1/gpus_per_node of each tensor over each GPU's own NIC.
  """
  t = 0.0
  per_node = target['devices_per_node']
  for op, n, size in records:
    f = ring_factor(op, full_fsdp)
    if n <= per_node:
      t += f * (n - 1) / n * size / (target['intra_gb_s'] * 1e9)
    else:
      nodes = n / per_node
      t += f * (per_node - 1) / per_node * size / (target['intra_gb_s'] * 1e9)
      t += f * (nodes - 1) / nodes * size / per_node / (target['inter_gb_s'] * 1e9)
  return t


def main(argv):
  del argv
  import jax
  import train_step as bench_step

  from stop_jax import config as config_lib
  from stop_jax.data import masking
  from stop_jax.runtime import sharding
  from stop_jax.train import setup
  from stop_jax.train.schedules import Schedules

  config = _CONFIG.value
  config.model.dtype = 'bfloat16'
  config.model.scan_blocks = False  # while-loop bodies would hide per-layer collectives
  _, depth_real, _, _ = config_lib.vit_shape(config.model)
  n = jax.device_count()
  config.data.global_batch_size = _BATCH.value * n
  meshes = {
    'data parallel': (n, 1),
    'FSDP (all devices)': (1, n),
    'FSDP 8 x data': (n // 8, 8),
  }
  spec = masking.spec_from_config(config)
  per_device_flops = (
    bench_step.model_flops(config, spec.num_context_tokens, spec.num_target_tokens, _BATCH.value)[
      'total'
    ]
    * {'none': 1.0, 'dots': 1.1, 'block': 4 / 3}[config.model.remat]
  )
  results = {'per_device_batch': _BATCH.value, 'devices_compiled': n, 'depth': depth_real}
  results['useful_tflop_per_device_step'] = per_device_flops / 1e12
  for name, (data, fsdp) in meshes.items():
    per_depth = {}
    for depth in (2, 4):
      c = config.copy_and_resolve_references()
      c.model.depth = depth
      c.mesh.data, c.mesh.fsdp = data, fsdp
      mesh = sharding.make_mesh(c)
      sharded = setup.make_sharded_step(c, mesh, Schedules.from_config(c, 1000))
      per_depth[depth] = collectives(sharded.lower(c, spec).compile().as_text(), n)

    # Affine in depth: the real depth's collectives = depth-2 ones + (d - 2)/2 x the added ones.
    # Records are scaled by weighting their sizes; extrapolate by kind, group and size.
    c2, c4 = collections.Counter(per_depth[2]), collections.Counter(per_depth[4])
    records = []
    for r in set(c2) | set(c4):
      k = c2.get(r, 0) + (c4.get(r, 0) - c2.get(r, 0)) / 2 * (depth_real - 2)
      records.append((r[0], r[1], r[2] * k))
    full_fsdp = data == 1 and fsdp > 1
    total = collective_bytes(records, full_fsdp)
    comm = sum(total.values())
    row = {'bytes_per_device_per_step': total, 'total_gb': comm / 1e9}
    for target in TARGETS:
      t_compute = per_device_flops / (target['peak_tflops'] * 1e12 * _MFU.value)
      t_comm = comm_seconds(records, full_fsdp, target)
      row[target['name']] = {
        't_compute_s': t_compute,
        't_comm_s': t_comm,
        'efficiency_overlapped': t_compute / max(t_compute, t_comm),
        'efficiency_serial': t_compute / (t_compute + t_comm),
        'images_per_s_per_device': _BATCH.value / max(t_compute, t_comm),
      }
    results[name] = row
    print(f'{name}: {comm / 1e9:.2f} GB sent per device per step ({", ".join(sorted(total))})')
    for target in TARGETS:
      r = row[target['name']]
      print(
        f'  {target["name"]:<30} compute {r["t_compute_s"] * 1e3:7.1f} ms, comm '
        f'{r["t_comm_s"] * 1e3:7.1f} ms -> efficiency {100 * r["efficiency_overlapped"]:.0f}% '
        f'overlapped, {100 * r["efficiency_serial"]:.0f}% serial'
      )
  results['assumptions'] = {
    'mfu_of_datasheet_peak': _MFU.value,
    'targets': list(TARGETS),
  }
  print('RESULT ' + json.dumps(results))


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/vith14.py', 'Config file.')
  _BATCH = flags.DEFINE_integer('per_device_batch', 32, 'Examples per device (weak scaling).')
  _MFU = flags.DEFINE_float('mfu', 0.5, 'Assumed MFU of the compute part, vs the bf16 peak.')
  flags.DEFINE_integer('num_devices', 64, 'Simulated devices (set before JAX starts).')
  app.run(main)
