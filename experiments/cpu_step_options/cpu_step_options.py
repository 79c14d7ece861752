r"""The CPU step's knobs side by side: matmul library and scanned blocks, interleaved in one run.

Commands (from the repo root):
  python experiments/cpu_step_options/cpu_step_options.py       # ViT-Ti/16 step, 8 rounds
  python experiments/cpu_step_options/cpu_step_options.py --rounds=12 \
    --config.data.global_batch_size=32

Measured results: experiments/cpu_step_options/RESULTS.md.

Each variant is the real train step (bench/train_step.py's `build_step`, state donated) of the
ViT-Ti/16 preset, changed in one knob and compiled with the trainer's `compiler.compiler_options`:
  onednn    the default: `xla_cpu_matmul='onednn'`, blocks unrolled (the preset);
  eigen     `xla_cpu_matmul='eigen'`;
  ynnpack   `xla_cpu_matmul='ynnpack'` (XLA:CPU's own default);
  scan      `model.scan_blocks=True` (the configs' default; compile time flat in depth).
All are compiled first, then timed in `--rounds` rounds of one step each, the order reversed
every round, so load from other jobs on a shared VM hits every variant alike: run to run, the
absolute times move far more than the ratios. Prints the median step time of each and its ratio
to the first (onednn), the losses after the run (they agree to rounding: same step, sums in
another order), and `RESULT {json}`.

The process restarts itself with huge-page malloc as the trainer does
(stop_jax/runtime/host_devices.py); run with STOP_JAX_HUGEPAGE_MALLOC=0 to time the step
without it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

# The repo root (two levels up) for stop_jax, and bench/ for its train_step module.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, 'bench')
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

if __name__ == '__main__':
  from stop_jax.runtime import host_devices

  host_devices.restart_with_hugepage_malloc()

import jax  # noqa: E402
import train_step  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from stop_jax.runtime import compiler  # noqa: E402

VARIANTS = {
  'onednn': {},
  'eigen': {'xla_cpu_matmul': 'eigen'},
  'ynnpack': {'xla_cpu_matmul': 'ynnpack'},
  'scan': {'model.scan_blocks': True},
}


def run(config, rounds: int) -> dict:
  batch = train_step.make_batch(config, config.data.global_batch_size)
  rng = jax.random.key(config.seed + 1)
  steps = {}
  for name, changes in VARIANTS.items():
    c = config.copy_and_resolve_references()
    c.update_from_flattened_dict(changes)
    fn, state = train_step.build_step(c)
    t0 = time.perf_counter()
    compiled = compiler.compile_lowered(fn.lower(state, batch, rng), c.xla_cpu_matmul)
    steps[name] = [compiled, state]
    print(f'{name}: compiled in {time.perf_counter() - t0:.1f}s', flush=True)
  times = {name: [] for name in steps}
  losses = {}
  for r in range(rounds + 1):  # round 0 warms up
    for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
      compiled, state = steps[name]
      t = time.perf_counter()
      state, metrics = compiled(state, batch, rng)
      jax.block_until_ready(metrics)
      steps[name][1] = state
      losses[name] = float(metrics['loss'])
      if r:
        times[name].append(time.perf_counter() - t)
  medians = {name: statistics.median(t) for name, t in times.items()}
  first = medians[next(iter(medians))]
  return {
    'median_s': medians,
    'min_s': {name: min(t) for name, t in times.items()},
    'ratio_to_first': {name: m / first for name, m in medians.items()},
    'loss_after': losses,
    'rounds': rounds,
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    'load_average': os.getloadavg()[0],
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  r = run(_CONFIG.value, _ROUNDS.value)
  for name in VARIANTS:
    print(
      f'{name:8s} median {r["median_s"][name]:.3f} s (min {r["min_s"][name]:.3f}); '
      f'x{r["ratio_to_first"][name]:.3f} of onednn; loss after {r["loss_after"][name]:.5f}'
    )
  print('RESULT ' + json.dumps(r))


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    os.path.join(BENCH, 'train_step.py') + ':vit_ti16',
    'The setting the variants change (default: the ViT-Ti/16 preset).',
  )
  _ROUNDS = flags.DEFINE_integer('rounds', 8, 'Timed rounds (one step of every variant each).')
  app.run(main)
