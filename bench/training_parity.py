r"""Training parity over the whole grid: our training against the official PyTorch training.

Commands (from the repo root; needs torch):
  python bench/training_parity.py                     # all 32 settings, 30 steps each
  python bench/training_parity.py --patches=16 --modes=masked,off --layers=1 --clips=0

Every setting is `reference.trajectory.run_pair`: a small float32 ViT (8x8 patches, width 64,
depth 4; predictor 32 wide, 2 deep), the same initial weights, images, masks and StoP noise on both
sides, the official recipe compressed into the run (warmup, cosine, LR / WD holds, EMA momentum
0.9 -> 1.0). The grid: patch 16 / 14 x StoP mode masked / off / context / both x K = 1 / 4 target
layers x encoder clipping off / on (1e-4, which clips the early steps only).

Printed: per setting, the largest relative loss difference over the steps and, at the end, the
largest relative difference (max |a - b| / max |b| per tensor) of each tensor family: encoder and
predictor params, the EMA target, Adam's first and second moments; then the per-step curve of the
relative loss difference (max over settings), which shows how fp32 rounding grows with the steps;
and a final `RESULT {json}` line. Put the figures in bench/NOTES.md with the CPU (`lscpu`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from reference import trajectory  # noqa: E402

_PATCHES = flags.DEFINE_list('patches', ['16', '14'], 'Patch sizes.')
_MODES = flags.DEFINE_list('modes', ['masked', 'off', 'context', 'both'], 'StoP modes.')
_LAYERS = flags.DEFINE_list('layers', ['1', '4'], 'Target layers K.')
_CLIPS = flags.DEFINE_list('clips', ['0', '1e-4'], 'Encoder clipping thresholds (0 = off).')


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def main(argv):
  del argv
  logging.disable(logging.WARNING)  # the converter's notes about the unused mask token
  settings = [
    trajectory.Setting(patch=int(p), mode=m, target_layers=int(k), clip=float(c))
    for p, m, k, c in itertools.product(_PATCHES.value, _MODES.value, _LAYERS.value, _CLIPS.value)
  ]
  print(f'CPU: {cpu_model()}; {len(settings)} settings of 30 steps')
  families: dict[str, float] = {}
  curve = None
  rows = []
  t0 = time.perf_counter()
  for s in settings:
    r = trajectory.run_pair(s)
    rel = np.asarray(r['loss_rel'])
    curve = rel if curve is None else np.maximum(curve, rel)
    worst = {f: max(v.values()) for f, v in r['tensors'].items()}
    for f, v in worst.items():
      families[f] = max(families.get(f, 0.0), v)
    rows.append({'setting': s.name, 'loss_rel_max': float(rel.max()), **worst,
                 'clipped_steps': r['clipped_steps'], 'k_ctx': r['k_ctx'], 'k_tgt': r['k_tgt']})  # fmt: skip
    print(
      f'{s.name:28s} loss {rel.max():.1e}  '
      + '  '.join(f'{f} {v:.1e}' for f, v in worst.items())
      + f'  clipped {r["clipped_steps"]}/30  loss {r["ours"][0]:.4f} -> {r["ours"][-1]:.4f}'
    )
  print('max over settings:', '  '.join(f'{f} {v:.1e}' for f, v in families.items()))
  print('per-step max relative loss difference:')
  print('  ' + ' '.join(f'{v:.0e}' for v in curve))
  result = {
    'cpu': cpu_model(),
    'settings': rows,
    'families_max': families,
    'loss_rel_max': float(curve.max()),
    'loss_rel_curve': [float(v) for v in curve],
    'seconds': round(time.perf_counter() - t0, 1),
  }
  print('RESULT ' + json.dumps(result))


if __name__ == '__main__':
  app.run(main)
