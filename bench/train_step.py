r"""Benchmark of the real jitted train step: compile time, step time, images/s, FLOPs, MFU.

Commands (from the repo root):
  python bench/train_step.py --preset=vit_ti16
  python bench/train_step.py --config=configs/tiny.py --steps=20
  python bench/train_step.py --config=configs/vitb16.py --batch=64 --config.model.dtype=bfloat16
  # A preset with overrides: this file is also a config file (`get_config`).
  python bench/train_step.py --config=bench/train_step.py:vit_ti16 --config.model.scan_blocks=True

It times `step_lib.make_train_step` exactly as the trainer runs it (jitted, state donated) on one
fixed batch of synthetic normalised images with real masks from `masking.sample_masks`, so it
measures the model and optimiser, not the input pipeline. `--preset=vit_ti16` is the reference
CPU setting of the issue: ViT-Ti/16 at 224, predictor 384 wide, 6 deep, 3 heads, 4 target
blocks, batch 16, float32, blocks unrolled, oneDNN dots (the official PyTorch step takes about
4.2 s on the 2-core dev VM of the issue; 3-3.4 s on the VM of 2026-12-01).

Figures printed (also as one JSON line prefixed `RESULT `, for scripts):
  compile        lower (trace) and XLA compile time of the step, seconds.
  step time      median wall time of `--steps` steps after `--warmup` untimed ones, each one
                 ending in block_until_ready on the metrics.
  images/s       global batch / median step time.
  useful FLOPs   `model_flops`: an analytic matmul count (see its docstring).
  XLA FLOPs      `compiled.cost_analysis()['flops']` of the same step, a cross-check. XLA counts
                 a while loop's body once, so with scanned blocks (`model.scan_blocks=True`, the
                 configs' default) it undercounts by about the depth; `--xla_unrolled` (default
                 on) also compiles an unrolled copy just to read its estimate. XLA also counts
                 elementwise ops and whatever the backward really computes, so expect it a
                 little higher.
  matmul peak    the best GFLOP/s of a jitted 2048^3 matmul in the compute dtype (float32 unless
                 `model.dtype=bfloat16`) on this machine, this run, measured before and after
                 the timed steps (best kept; both printed). On CPU, the best of the oneDNN,
                 Eigen and YNNPACK matmuls.
  MFU            (useful FLOPs / median step time) / matmul peak.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

# `python bench/train_step.py` puts bench/ on the path, not the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == '__main__':
  # As the trainer does (stop_jax/main.py): huge-page malloc for XLA:CPU's per-step temporaries.
  from stop_jax.runtime import host_devices

  host_devices.restart_with_hugepage_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from stop_jax import config as config_lib  # noqa: E402
from stop_jax import models
from stop_jax.data import masking  # noqa: E402
from stop_jax.runtime import compiler  # noqa: E402
from stop_jax.train import step as step_lib
from stop_jax.train.schedules import Schedules  # noqa: E402

# Only sets the schedule horizon, which changes values, never the cost of a step.
_STEPS_PER_EPOCH = 1000


def vit_ti16_config() -> ml_collections.ConfigDict:
  """ViT-Ti/16 at 224, base-config predictor (384 wide, 6 deep, encoder heads), batch 16, fp32.

  Blocks unrolled and oneDNN dots (the default `xla_cpu_matmul`): the faster CPU setting for a
  model this small (bench/README.md has the scanned and YNNPACK rows beside it).
  """
  c = config_lib.base_config()
  c.model.variant = 'tiny'
  c.model.patch_size, c.model.image_size = 16, 224
  c.model.dtype = 'float32'
  c.predictor.width, c.predictor.depth, c.predictor.num_heads = 384, 6, -1
  c.mask.num_targets = 4
  c.data.source = 'synthetic'
  c.data.global_batch_size = 16
  c.model.scan_blocks = False  # 12 + 6 blocks unrolled compile in ~15 s here; ~10% faster steps
  return config_lib.lock(c)


PRESETS = {'vit_ti16': vit_ti16_config}


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs.


def _block_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """Matmul FLOPs of one pre-norm block on one sequence (qkv, proj, fc1, fc2, attention)."""
  dense = 2 * tokens * width * (3 * width + width + 2 * mlp_dim)
  # q k^T and probs @ v: each 2 * T * T * head_dim per head, i.e. 2 * T * T * width in all.
  attention = 2 * (2 * tokens * tokens * width)
  return dense + attention


def model_flops(config, k_ctx: int, k_tgt: int, batch: int) -> dict[str, float]:
  """Useful matmul FLOPs of one train step, by part, and their 'total'.

  Conventions (the usual MFU ones, so figures compare with other codebases):
  - a matmul [m, k] @ [k, n] costs 2 m n k; elementwise ops (norms, GELU, softmax, the loss,
    AdamW, the EMA) are ignored;
  - the patch embedding is a matmul [tokens, p*p*3] @ [p*p*3, d_e], counted only on the tokens
    that are used: all N for the target encoder, the K_ctx kept ones for the context encoder
    (our implementation convolves the whole image and then gathers, so it does N - K_ctx tokens
    of extra, non-useful work there);
  - attention counts q k^T and probs @ v (2 T^2 d each) on the full static sequence length;
  - backward = 2 x forward for everything that is trained (the context encoder and the
    predictor), even where an input gradient is not needed (the patch embedding, the
    noise projection): a slight overcount, the standard 6ND convention;
  - the target encoder runs forward only on all N tokens; no rematerialised FLOPs are counted
    (with `model.remat='block'` the step really does one more forward of each block);
  - the predictor: `predictor_embed` once on the K_ctx context tokens (the official code embeds
    before repeating the context per target block), plus, in the noise modes, once on the K_tgt
    noise tokens of each target block (`noise_proj` for `untied`); then, for each of the n
    target blocks, the blocks on K_ctx + K_tgt tokens and `predictor_proj` on the K_tgt target
    tokens.
  Padding slots (valid=False) inside the static K_ctx / K_tgt are counted: they are computed.

  Args:
    config: the run config (model, predictor, mask.num_targets, stop.mode).
    k_ctx, k_tgt: static context tokens per image and tokens per target block.
    batch: global batch size.
  Returns:
    {'target_encoder_fwd', 'context_encoder_fwd_bwd', 'predictor_fwd_bwd', 'total'} plus the
    forward pieces `*_fwd` of the predictor, all in FLOPs per step (floats).
  """
  m = config.model
  d_e, depth, _, ratio = config_lib.vit_shape(m)
  mlp_e = int(d_e * ratio)
  n_tok = (m.image_size // m.patch_size) ** 2
  patch_dim = m.patch_size * m.patch_size * 3
  p = config.predictor
  d_p, mlp_p, n = p.width, 4 * p.width, config.mask.num_targets

  def encoder_fwd(tokens):
    return 2 * tokens * patch_dim * d_e + depth * _block_flops(tokens, d_e, mlp_e)

  noise_tokens = n * k_tgt if config.stop.mode in ('masked', 'both', 'untied') else 0
  embed = 2 * (k_ctx + noise_tokens) * d_e * d_p
  blocks = n * p.depth * _block_flops(k_ctx + k_tgt, d_p, mlp_p)
  proj = n * 2 * k_tgt * d_p * d_e
  out = {
    'target_encoder_fwd': batch * encoder_fwd(n_tok),
    'context_encoder_fwd_bwd': 3 * batch * encoder_fwd(k_ctx),
    'predictor_fwd_bwd': 3 * batch * (embed + blocks + proj),
    'predictor_embed_fwd': batch * embed,
    'predictor_blocks_fwd': batch * blocks,
    'predictor_proj_fwd': batch * proj,
  }
  out = {k: float(v) for k, v in out.items()}
  out['total'] = (
    out['target_encoder_fwd'] + out['context_encoder_fwd_bwd'] + out['predictor_fwd_bwd']
  )
  return out


# ---------------------------------------------------------------------------------------------
# Measurements.


def matmul_peak_gflops(size: int = 2048, dtype=jnp.float32, repeats: int = 8) -> float:
  """Best-of-`repeats` GFLOP/s of a jitted [size, size] @ [size, size] in `dtype` on device 0.

  On CPU, the best of the matmul libraries `config.xla_cpu_matmul` can pick (oneDNN, Eigen and
  XLA's default YNNPACK): MFU is then against the fastest.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (size, size), dtype)
  b = jax.random.normal(kb, (size, size), dtype)
  lowered = jax.jit(jnp.matmul).lower(a, b)
  options = [{}]
  if jax.default_backend() == 'cpu':
    for library in ('onednn', 'eigen'):
      options.append(compiler.compiler_options(library, 'cpu'))
  best = float('inf')
  for opts in options:
    matmul = lowered.compile(opts)
    matmul(a, b).block_until_ready()  # first-touch
    for _ in range(repeats):
      t0 = time.perf_counter()
      matmul(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
  return 2 * size**3 / best / 1e9


# Dense bf16 datasheet peaks (TFLOP/s) by device_kind substring; MFU on accelerators uses these.
DATASHEET_BF16_TFLOPS = (
  ('H200', 989.4),
  ('H100', 989.4),  # SXM; the PCIe card is 756
  ('A100', 312.0),
  ('TPU v6', 918.0),
  ('TPU v5p', 459.0),
  ('TPU v5', 197.0),  # v5e ('TPU v5 lite')
  ('TPU v4', 275.0),
)


def datasheet_peak_gflops(device_kind: str, dtype: str) -> float | None:
  if dtype != 'bfloat16':
    return None
  for name, tflops in DATASHEET_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops * 1e3
  return None


def xla_flops(compiled) -> float | None:
  """'flops' from cost_analysis(): a dict in current jax, a list of per-module dicts before."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it; the bench still runs.
    return None
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  return None if not cost or 'flops' not in cost else float(cost['flops'])


def make_batch(config, batch_size: int) -> dict:
  """Synthetic normalised images (N(0, 1), as normalised pixels) with real sampled masks."""
  size = config.model.image_size
  images = jax.random.normal(jax.random.key(1), (batch_size, size, size, 3), jnp.float32)
  spec = masking.spec_from_config(config)
  masks = masking.sample_masks(spec, config.seed, 0, batch_size)
  return {'image': images, **{k: jnp.asarray(v) for k, v in masks.items()}}


def build_step(config):
  """(jitted donated step, initial state) as the trainer builds them, on one device."""
  encoder, predictor = models.build_encoder(config), models.build_predictor(config)
  tx = step_lib.make_optimizer(config)
  schedules = Schedules.from_config(config, _STEPS_PER_EPOCH)
  state = jax.jit(lambda r: step_lib.create_train_state(encoder, predictor, tx, config, r))(
    jax.random.key(config.seed)
  )
  step_fn = jax.jit(
    step_lib.make_train_step(config, encoder, predictor, tx, schedules), donate_argnums=(0,)
  )
  return step_fn, state


def bench(config, steps: int, warmup: int, xla_unrolled: bool, peak_size: int) -> dict:
  config_lib.validate(config)
  load_at_start = os.getloadavg()[0]  # before we add our own load
  # Measured before and after the steps, best kept: on a shared machine either may be slowed.
  # In the compute dtype: a bfloat16 step is compared with the bfloat16 peak.
  peak_dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  peak_before = matmul_peak_gflops(peak_size, peak_dtype)
  batch_size = config.data.global_batch_size
  batch = make_batch(config, batch_size)
  n_targets, _, k_tgt = batch['tgt_idx'].shape
  k_ctx = batch['ctx_idx'].shape[1]
  step_fn, state = build_step(config)
  rng = jax.random.key(config.seed + 1)

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch, rng)
  t1 = time.perf_counter()
  compiled = compiler.compile_lowered(lowered, config.xla_cpu_matmul)  # as the trainer compiles
  t2 = time.perf_counter()
  xla_step = xla_flops(compiled)

  times = []
  for i in range(warmup + steps):
    if i == warmup:
      cpu0, wall0 = time.process_time(), time.perf_counter()
    t = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - t)
  # Host CPU seconds per wall second per core: well below 1 means the cores were shared with other
  # processes (or XLA left them idle), so the step times are pessimistic.
  cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0) / os.cpu_count()
  median = statistics.median(times)
  # Back to back with one sync at the end, as the trainer runs: the host enqueues step i+1 while
  # the device computes step i. This is the figure for accelerators (per-step syncs idle them).
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  pipelined = (time.perf_counter() - t) / steps
  loss = float(metrics['loss'])
  stats = jax.devices()[0].memory_stats() or {}
  peak_memory = stats.get('peak_bytes_in_use')

  xla_unrolled_flops = None
  if xla_unrolled and config.model.scan_blocks:
    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan_blocks = False
    fn, st = build_step(unrolled)
    xla_unrolled_flops = xla_flops(fn.lower(st, batch, rng).compile())
    del fn, st

  peak_after = matmul_peak_gflops(peak_size, peak_dtype)
  peak = max(peak_before, peak_after)
  flops = model_flops(config, k_ctx, k_tgt, batch_size)
  on_cpu = jax.default_backend() == 'cpu'
  step_time = median if on_cpu else pipelined
  achieved = flops['total'] / step_time / 1e9
  datasheet = datasheet_peak_gflops(str(jax.devices()[0].device_kind), config.model.dtype)
  n_params = {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in state.params.items()}
  valid_ctx = float(np.mean(np.sum(np.asarray(batch['ctx_valid']), axis=-1)))
  valid_tgt = float(np.mean(np.sum(np.asarray(batch['tgt_valid']), axis=-1)))
  width, depth, heads, _ = config_lib.vit_shape(config.model)
  return {
    'backend': jax.default_backend(),
    'device': str(jax.devices()[0].device_kind),
    'cpu_count': os.cpu_count(),
    'load_avg_1m_at_start': load_at_start,
    'cpu_util_timed_steps': cpu_util,
    'batch': batch_size,
    'image_size': config.model.image_size,
    'patch_size': config.model.patch_size,
    'encoder': f'{width} x {depth}, {heads} heads',
    'predictor': f'{config.predictor.width} x {config.predictor.depth}',
    'dtype': config.model.dtype,
    'stop_mode': config.stop.mode,
    'gelu': config.model.gelu,
    'scan_blocks': bool(config.model.scan_blocks),
    'remat': config.model.remat,
    'params_encoder': n_params['encoder'],
    'params_predictor': n_params['predictor'],
    'num_targets': int(n_targets),
    'k_ctx': int(k_ctx),
    'k_tgt': int(k_tgt),
    'valid_ctx_mean': valid_ctx,
    'valid_tgt_mean': valid_tgt,
    'lower_s': t1 - t0,
    'compile_s': t2 - t1,
    'step_s_median': median,
    'step_s_min': min(times),
    'step_s_max': max(times),
    'step_s_all': times,
    'step_s_pipelined': pipelined,
    'step_s_used': step_time,
    'images_per_s': batch_size / step_time,
    'peak_memory_bytes': peak_memory,
    'loss_last': loss,
    'flops_breakdown_gflop': {k: v / 1e9 for k, v in flops.items()},
    'analytic_gflop_per_step': flops['total'] / 1e9,
    'xla_gflop_per_step': None if xla_step is None else xla_step / 1e9,
    'xla_gflop_per_step_unrolled': (
      None if xla_unrolled_flops is None else xla_unrolled_flops / 1e9
    ),
    'matmul_peak_gflops': peak,
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    'matmul_peak_gflops_before_after': [peak_before, peak_after],
    'achieved_gflops': achieved,
    'datasheet_peak_gflops': datasheet,
    # CPU: against this machine's measured matmul peak; accelerators: against the datasheet.
    'mfu': achieved / (peak if on_cpu or datasheet is None else datasheet),
    'mfu_vs_measured_matmul': achieved / peak,
  }


def _print_human(r: dict):
  print(
    f'setting: {r["encoder"]} encoder, predictor {r["predictor"]}, image {r["image_size"]}/'
    f'{r["patch_size"]}, batch {r["batch"]}, {r["dtype"]}, stop {r["stop_mode"]}, '
    f'gelu {r["gelu"]}, scan_blocks={r["scan_blocks"]}, remat={r["remat"]}'
  )
  print(
    f'machine: {r["backend"]} ({r["device"]}), {r["cpu_count"]} cores, '
    f'load average (1 min) at start {r["load_avg_1m_at_start"]:.2f}; our CPU use over the timed '
    f'steps {100 * r["cpu_util_timed_steps"]:.0f}% of all cores'
  )
  print(
    f'params: encoder {r["params_encoder"] / 1e6:.2f}M, predictor {r["params_predictor"] / 1e6:.2f}M'
  )
  print(
    f'tokens per image: {r["k_ctx"]} context (mean valid {r["valid_ctx_mean"]:.1f}), '
    f'{r["num_targets"]} x {r["k_tgt"]} target (mean valid {r["valid_tgt_mean"]:.1f})'
  )
  print(f'compile: lower {r["lower_s"]:.2f} s + compile {r["compile_s"]:.2f} s')
  print(
    f'step time: median {r["step_s_median"]:.4f} s (min {r["step_s_min"]:.4f}, max '
    f'{r["step_s_max"]:.4f}) over {len(r["step_s_all"])} steps; {r["images_per_s"]:.2f} images/s'
  )
  for k, v in r['flops_breakdown_gflop'].items():
    print(f'  {k:<26} {v:10.2f} GFLOP')
  xla, xla_u = r['xla_gflop_per_step'], r['xla_gflop_per_step_unrolled']
  before, after = r['matmul_peak_gflops_before_after']
  line = f'useful FLOPs: analytic {r["analytic_gflop_per_step"]:.2f} GFLOP/step'
  if xla is not None:
    line += f'; XLA cost_analysis {xla:.2f}'
    if r['scan_blocks']:
      line += ' (scan body counted once)'
  if xla_u is not None:
    line += f', unrolled {xla_u:.2f}'
  print(line)
  print(
    f'matmul peak ({r["dtype"]}): {r["matmul_peak_gflops"]:.1f} GFLOP/s (before / after the steps: '
    f'{before:.1f} / {after:.1f}); achieved {r["achieved_gflops"]:.1f} GFLOP/s; '
    f'MFU {100 * r["mfu"]:.1f}%'
  )
  if r['datasheet_peak_gflops']:
    print(
      f'accelerator: back-to-back step {r["step_s_pipelined"]:.4f} s; datasheet bf16 peak '
      f'{r["datasheet_peak_gflops"] / 1e3:.0f} TFLOP/s; MFU {100 * r["mfu"]:.1f}% '
      f'({100 * r["mfu_vs_measured_matmul"]:.1f}% of the measured matmul peak); peak memory '
      f'{(r["peak_memory_bytes"] or 0) / 2**30:.2f} GiB'
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Makes this file a config file too, so presets take overrides: see the module docstring."""
  name = arg or 'vit_ti16'
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}: expected one of {sorted(PRESETS)}.')
  return PRESETS[name]()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (_PRESET.value is None) == (_CONFIG.value is None):
    raise app.UsageError('give exactly one of --config=<file> or --preset=vit_ti16.')
  config = get_config(_PRESET.value) if _PRESET.value else _CONFIG.value
  if _BATCH.value is not None:
    config.data.global_batch_size = _BATCH.value
  result = bench(config, _STEPS.value, _WARMUP.value, _XLA_UNROLLED.value, _PEAK_SIZE.value)
  result['config'] = _PRESET.value or config_flags.get_config_filename(flags.FLAGS['config'])
  _print_human(result)
  print('RESULT ' + json.dumps(result))


if __name__ == '__main__':
  # Defined only when run as a script: `--config=bench/train_step.py:vit_ti16` loads this file
  # again as a config module, and defining the flags twice would raise.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
  _PRESET = flags.DEFINE_enum('preset', None, list(PRESETS), 'A built-in setting (no overrides).')
  _BATCH = flags.DEFINE_integer('batch', None, 'Global batch size (default: the config).')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
  _WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  _XLA_UNROLLED = flags.DEFINE_bool(
    'xla_unrolled', True, 'With scanned blocks, also compile an unrolled copy for its XLA FLOPs.'
  )
  _PEAK_SIZE = flags.DEFINE_integer('peak_size', 2048, 'Matrix size of the matmul-peak probe.')
  app.run(main)
