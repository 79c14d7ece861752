r"""Compile time of the real train step against depth: flat with `nn.scan`, linear unrolled.

    python bench/compile_time.py                       # ViT-H/14, 8 simulated CPU devices
    python bench/compile_time.py --config=configs/vitl16.py --depths=6,12,24 --num_devices=8

Lowers and compiles the trainer's sharded step (`setup.make_sharded_step`, FSDP over all
devices, bf16 compute) for the config at several encoder depths, scanned and (for the smaller
depths) unrolled, and prints seconds per compile plus one `RESULT {json}` line. Target (issue
7): ViT-H/14 under 2 minutes, about flat in depth.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stop_jax.runtime import host_devices  # noqa: E402

host_devices.simulate_from_argv(sys.argv, default=8)

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from stop_jax.data import masking  # noqa: E402
from stop_jax.runtime import sharding  # noqa: E402
from stop_jax.train import setup  # noqa: E402
from stop_jax.train.schedules import Schedules  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/vith14.py', 'Config file.')
_DEPTHS = flags.DEFINE_list('depths', ['8', '16', '32'], 'Encoder depths to compile.')
_UNROLLED_MAX = flags.DEFINE_integer('unrolled_max_depth', 16, 'Also unrolled up to this depth.')
flags.DEFINE_integer('num_devices', 8, 'Simulated devices (set before JAX starts).')


def compile_seconds(config) -> float:
  mesh = sharding.make_mesh(config)
  t0 = time.perf_counter()
  sharded = setup.make_sharded_step(config, mesh, Schedules.from_config(config, 1000))
  sharded.compile(config, masking.spec_from_config(config))
  return time.perf_counter() - t0


def main(argv):
  del argv
  base = _CONFIG.value
  base.model.dtype = 'bfloat16'
  base.mesh.data, base.mesh.fsdp = 1, -1
  base.data.global_batch_size = 8 * jax.device_count()
  rows = []
  for depth in map(int, _DEPTHS.value):
    for scan in (True, False):
      if not scan and depth > _UNROLLED_MAX.value:
        continue
      c = base.copy_and_resolve_references()
      c.model.depth, c.model.scan_blocks = depth, scan
      s = compile_seconds(c)
      rows.append({'depth': depth, 'scan_blocks': scan, 'compile_s': s})
      print(f'depth {depth:3d} {"scan    " if scan else "unrolled"} compile {s:6.1f} s', flush=True)
  print('RESULT ' + json.dumps({'devices': jax.device_count(), 'rows': rows}))


if __name__ == '__main__':
  app.run(main)
