r"""Our jitted train step against the official PyTorch StoP step: same machine, same run, a ratio.

Commands (from the repo root):
  python bench/torch_reference.py                         # the issue's ViT-Ti/16 setting
  python bench/torch_reference.py --rounds=6 --steps_per_round=3
  python bench/torch_reference.py --nocheckpoint_blocks   # I-JEPA's step: no recomputation
  python bench/torch_reference.py --config.model.scan_blocks=True   # our step, changed

The reference setting (`--config`, default `bench/train_step.py:vit_ti16`, i.e.
`train_step.vit_ti16_config()`; overrides change our step, the official one follows the
shapes): ViT-Ti/16 at 224 (192 wide, 12 deep, 3 heads, MLP 768, exact GELU), predictor 384
wide, 6 deep, 3 heads, 4 target blocks, batch 16, float32, StoP noise (standard deviation
0.25) through the predictor's input Linear. Both steps take the same images and the same token
indices, from our `masking.sample_masks` as `train_step.make_batch` draws them (53 context and
4 x 33 target tokens per image at 224/16), so they do the same useful work.

The PyTorch side is a CPU re-implementation of the official StoP training step (amirbar/StoP
`main.py` and `src/deit.py`, itself I-JEPA's `src/train.py` and `vision_transformer.py` plus the
noise) on the official-layout modules of `reference/official_torch.py`, the same ones the
checkpoint-import parity test (`tests/tools/test_convert.py`) checks our models against. One step:
  1. target encoder on all 196 tokens under no_grad, F.layer_norm, gather each target block;
  2. context encoder on the context tokens; the predictor runs the context concatenated with each
     target block's tokens (sin-cos position + predictor_embed(N(0, 0.25^2) noise in d_e)) as a
     separate sequence: batch 4 x 16 sequences of 86 tokens;
  3. smooth-L1 loss, backward, AdamW (lr 1e-3, weight decay 0.04 except biases and 1-D params);
  4. EMA of the target encoder with momentum 0.996, after the optimiser step.
StoP's `Block` wraps `attn` and `mlp` (not the norms) in `torch.utils.checkpoint` in every model,
whatever its size, so its backward recomputes both forwards of every trained block: that is the
default here (`--checkpoint_blocks`; reentrant, the official call's default). I-JEPA's own blocks
do not checkpoint: `--nocheckpoint_blocks`. Left out as negligible: the per-step LR / WD /
momentum schedule updates (the values are held at their peaks; they never change the cost).

The timing alternates `--rounds` rounds of `--steps_per_round` official steps and as many of ours
(`train_step.build_step`, jitted and donated as the trainer runs it), swapping which goes first
every round, after `--warmup` untimed steps of each (and our compile). Alternating is what makes
the ratio meaningful on a shared machine: load from other jobs hits both sides alike. Every step
ends in a host sync (`float(loss)` as the official loop does; `block_until_ready` for ours).
About 75 s by default on a quiet 2-core machine.

Caveat, measured: "alike" holds only while the cores are not oversubscribed. At a load average
of ~7 on 2 cores the official step with 2 OpenMP threads slowed 10x (its threads wait on each
other at every op's barrier whenever one is descheduled) and ours about 4x, which flips the ratio
to ~2 in our favour. The script therefore prints a warning, and the RESULT carries it, when this
process got less than 80% of the cores on either side: such a ratio says how the two runtimes
share a crowded machine, not which step is faster.

Printed (and in the final `RESULT {json}` line): median / min / max step time of each, images/s,
the ratio ours / official images/s (> 1: ours is faster), the useful GFLOP/step of
`train_step.model_flops` and each side's achieved GFLOP/s (plus the official's executed GFLOP/s
with its recomputation counted), the f32 2048^3 matmul peak of each library on this machine,
both losses at step 0 (same init distributions and targets: they should agree to a few %), the
load average before and after, and CPU use over the timed steps: this process's, per side, and
the whole machine's (from /proc/stat; busy minus ours ~ other jobs, `steal` = the hypervisor's).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

# `python bench/torch_reference.py` puts bench/ on the path; the repo root is needed before
# `train_step` is imported, for the huge-page restart below.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == '__main__':
  # Both steps run in this process, so both get the trainer's huge-page malloc (fair).
  from stop_jax.runtime import host_devices

  host_devices.restart_with_hugepage_malloc()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import train_step  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from reference import official_torch  # noqa: E402
from stop_jax import config as config_lib  # noqa: E402
from stop_jax.runtime import compiler  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_step.py') + ':vit_ti16',
  'The setting (default: the ViT-Ti/16 preset). Overrides such as '
  '--config.model.scan_blocks=False change our step; the official one follows the shapes.',
)
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Rounds of (official steps, our steps).')
_STEPS = flags.DEFINE_integer('steps_per_round', 1, 'Timed steps of each side per round.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps of each side before the rounds.')
_CHECKPOINT = flags.DEFINE_bool(
  'checkpoint_blocks',
  True,
  "Official StoP: torch.utils.checkpoint around every block's attn and mlp (recomputed in the "
  "backward). False: I-JEPA's blocks, no recomputation.",
)
_THREADS = flags.DEFINE_integer(
  'threads', None, 'torch intra-op threads (default: os.cpu_count()); XLA always uses every core.'
)

# Official hyperparameters at their peaks (ViT-B ablation recipe; constant here).
_LR, _WEIGHT_DECAY, _MOMENTUM = 1e-3, 0.04, 0.996
# Below this share of the cores on either side, the ratio measures contention (see the docstring).
_MIN_CPU_USE = 0.8


# ---------------------------------------------------------------------------------------------
# The official step, on the official-layout modules of `reference.official_torch`.


def build_official(config, checkpoint: bool, seed: int = 0):
  """(encoder, target_encoder, predictor, AdamW) for `config`, initialised as the official code."""
  torch.manual_seed(seed)
  mods = official_torch.official_modules(config, float(config.stop.sigma), checkpoint)
  encoder, target, predictor = mods['encoder'], mods['target_encoder'], mods['predictor']
  official_torch.init_official(encoder)
  official_torch.init_official(predictor)
  target.load_state_dict(encoder.state_dict())  # the official deepcopy
  for t in target.parameters():
    t.requires_grad = False

  def decayed(mod, decay):
    return [t for n, t in mod.named_parameters() if (('bias' not in n) and t.ndim != 1) == decay]

  groups = [
    {'params': decayed(encoder, True)},
    {'params': decayed(predictor, True)},
    {'params': decayed(encoder, False), 'weight_decay': 0.0},
    {'params': decayed(predictor, False), 'weight_decay': 0.0},
  ]
  optimizer = torch.optim.AdamW(groups, lr=_LR, weight_decay=_WEIGHT_DECAY)
  return encoder, target, predictor, optimizer


def official_step(models, images, masks_enc, masks_pred, momentum: float = _MOMENTUM) -> float:
  """One official StoP train step (fp32, no grad clipping); returns the loss as the loop does."""
  encoder, target, predictor, optimizer = models
  with torch.no_grad():
    h = target(images)
    h = F.layer_norm(h, (h.size(-1),))  # over the feature dim, no affine
    h = official_torch.apply_masks(h, masks_pred).repeat_interleave(len(masks_enc), dim=0)
  z = predictor(encoder(images, masks_enc), masks_enc, masks_pred)
  loss = F.smooth_l1_loss(z, h, reduction='none').mean(dim=(1, 2)).mean()
  loss.backward()
  optimizer.step()
  optimizer.zero_grad()
  with torch.no_grad():
    for q, k in zip(encoder.parameters(), target.parameters(), strict=True):
      k.mul_(momentum).add_((1.0 - momentum) * q.detach())
  return loss.item()  # the official `float(loss)`: a host sync ending the step


# ---------------------------------------------------------------------------------------------
# Measurement helpers.


def torch_matmul_peak_gflops(size: int = 2048, repeats: int = 8) -> float:
  """Best-of-`repeats` GFLOP/s of a float32 [size, size] @ [size, size] in torch."""
  a, b = torch.randn(size, size), torch.randn(size, size)
  torch.mm(a, b)
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - t0)
  return 2 * size**3 / best / 1e9


def proc_stat() -> dict[str, int] | None:
  """Machine-wide CPU jiffies from /proc/stat (None off Linux)."""
  try:
    with open('/proc/stat') as f:
      fields = f.readline().split()[1:9]
  except OSError:
    return None
  names = ('user', 'nice', 'system', 'idle', 'iowait', 'irq', 'softirq', 'steal')
  return dict(zip(names, map(int, fields), strict=True))


def machine_use(before, after) -> dict[str, float] | None:
  """Fractions of all cores' time between two proc_stat() snapshots: busy (not idle / iowait)
  and steal (taken by the hypervisor for other VMs)."""
  if before is None or after is None:
    return None
  delta = {k: after[k] - before[k] for k in before}
  total = sum(delta.values()) or 1
  return {
    'busy': 1 - (delta['idle'] + delta['iowait']) / total,
    'steal': delta['steal'] / total,
  }


def executed_flops(config, k_ctx: int, k_tgt: int, batch: int, checkpoint: bool) -> float:
  """Matmul FLOPs the official step executes: the useful ones plus, with its checkpointing, one
  more forward of every attn and mlp of the context encoder and of the predictor."""
  useful = train_step.model_flops(config, k_ctx, k_tgt, batch)['total']
  if not checkpoint:
    return useful
  width, depth, _, ratio = config_lib.vit_shape(config.model)
  p = config.predictor
  encoder = depth * train_step._block_flops(k_ctx, width, int(width * ratio))
  pred = (
    config.mask.num_targets * p.depth * train_step._block_flops(k_ctx + k_tgt, p.width, 4 * p.width)
  )
  return useful + batch * (encoder + pred)


def _summary(times: list[float], batch: int, gflop: float) -> dict:
  median = statistics.median(times)
  return {
    'step_s_median': median,
    'step_s_min': min(times),
    'step_s_max': max(times),
    'step_s_all': times,
    'images_per_s': batch / median,
    'achieved_gflops': gflop / median,
  }


# ---------------------------------------------------------------------------------------------


def run(
  config, rounds: int, steps_per_round: int, warmup: int, checkpoint: bool, threads: int
) -> dict:
  """Builds both steps on the same batch, warms both up, then times them interleaved."""
  load_start = os.getloadavg()
  torch.set_num_threads(threads)
  batch_size = config.data.global_batch_size
  batch = train_step.make_batch(config, batch_size)
  n_targets, _, k_tgt = batch['tgt_idx'].shape
  k_ctx = batch['ctx_idx'].shape[1]

  # Same images (NHWC -> NCHW) and the same token indices for the official step.
  images = torch.from_numpy(np.array(batch['image'])).permute(0, 3, 1, 2).contiguous()
  masks_enc = [torch.from_numpy(np.array(batch['ctx_idx'])).long()]
  tgt = np.array(batch['tgt_idx'])
  masks_pred = [torch.from_numpy(tgt[i]).long() for i in range(n_targets)]
  models = build_official(config, checkpoint, seed=config.seed)
  n_torch = {
    'encoder': sum(t.numel() for t in models[0].parameters() if t.requires_grad),
    'predictor': sum(t.numel() for t in models[2].parameters() if t.requires_grad),
  }

  step_fn, state = train_step.build_step(config)
  n_ours = {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in state.params.items()}
  rng = jax.random.key(config.seed + 1)
  t0 = time.perf_counter()
  compiled = compiler.compile_lowered(step_fn.lower(state, batch, rng), config.xla_cpu_matmul)
  compile_s = time.perf_counter() - t0

  peaks = {'xla': [train_step.matmul_peak_gflops()], 'torch': [torch_matmul_peak_gflops()]}

  def ours_once():
    nonlocal state
    state, metrics = compiled(state, batch, rng)
    return float(jax.block_until_ready(metrics)['loss'])

  steps = {
    'official': lambda: official_step(models, images, masks_enc, masks_pred),
    'ours': ours_once,
  }
  loss0 = {name: fn() for name, fn in steps.items()}  # the first call: the initial params' loss
  losses = dict(loss0)
  for _ in range(warmup - 1):
    for fn in steps.values():
      fn()

  times = {name: [] for name in steps}
  cpu = {name: 0.0 for name in steps}
  wall = {name: 0.0 for name in steps}
  stat0, timed0 = proc_stat(), time.perf_counter()
  for r in range(rounds):
    # Swap the order every round so neither side always runs right after the other.
    order = ('official', 'ours') if r % 2 == 0 else ('ours', 'official')
    for name in order:
      c0, w0 = time.process_time(), time.perf_counter()
      for _ in range(steps_per_round):
        t = time.perf_counter()
        losses[name] = steps[name]()
        times[name].append(time.perf_counter() - t)
      cpu[name] += time.process_time() - c0
      wall[name] += time.perf_counter() - w0
  machine = machine_use(stat0, proc_stat())
  # Paired per round: both sides ran within seconds of each other, under about the same load.
  per_round = [
    statistics.median(times['official'][i : i + steps_per_round])
    / statistics.median(times['ours'][i : i + steps_per_round])
    for i in range(0, rounds * steps_per_round, steps_per_round)
  ]
  timed_s = time.perf_counter() - timed0
  load_end = os.getloadavg()
  peaks['xla'].append(train_step.matmul_peak_gflops())
  peaks['torch'].append(torch_matmul_peak_gflops())

  use = {k: cpu[k] / wall[k] / os.cpu_count() for k in steps}
  # Of the cores each side can use: torch is limited to `threads` of them.
  share = {'official': use['official'] * os.cpu_count() / min(threads, os.cpu_count())}
  share['ours'] = use['ours']
  warning = None
  if min(share.values()) < _MIN_CPU_USE:
    warning = (
      f'this process got only {100 * min(share.values()):.0f}% of the cores it could use: '
      'other jobs oversubscribed them, which slows an OpenMP runtime (torch) far more than '
      'XLA; the ratio is not a speed comparison. Rerun on a quieter machine.'
    )
  useful = train_step.model_flops(config, k_ctx, k_tgt, batch_size)
  useful_gflop = useful['total'] / 1e9
  executed_gflop = executed_flops(config, k_ctx, k_tgt, batch_size, checkpoint) / 1e9
  cores = os.cpu_count()
  official = _summary(times['official'], batch_size, useful_gflop)
  official['executed_gflops'] = executed_gflop / official['step_s_median']
  ours = _summary(times['ours'], batch_size, useful_gflop)
  width, depth, heads, _ = config_lib.vit_shape(config.model)
  return {
    'setting': 'vit_ti16',
    'encoder': f'{width} x {depth}, {heads} heads',
    'predictor': f'{config.predictor.width} x {config.predictor.depth}',
    'batch': batch_size,
    'num_targets': int(n_targets),
    'k_ctx': int(k_ctx),
    'k_tgt': int(k_tgt),
    'valid_ctx_mean': float(np.asarray(batch['ctx_valid']).sum(-1).mean()),
    'checkpoint_blocks': checkpoint,
    'torch_version': torch.__version__,
    'jax_version': jax.__version__,
    'torch_threads': threads,
    'cpu_count': cores,
    'our_scan_blocks': bool(config.model.scan_blocks),
    'our_remat': config.model.remat,
    'params_official': n_torch,
    'params_ours': n_ours,
    'our_compile_s': compile_s,
    'rounds': rounds,
    'steps_per_round': steps_per_round,
    'warmup': warmup,
    'timed_s': timed_s,
    'loss_step0': loss0,
    'loss_last': losses,
    'useful_gflop_per_step': useful_gflop,
    'official_executed_gflop_per_step': executed_gflop,
    'official': official,
    'ours': ours,
    'ratio_ours_over_official_images_per_s': ours['images_per_s'] / official['images_per_s'],
    'ratio_per_round': per_round,
    'ratio_median_of_rounds': statistics.median(per_round),
    'matmul_peak_gflops_f32': {k: max(v) for k, v in peaks.items()},
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    'matmul_peak_gflops_f32_before_after': peaks,
    'load_avg_1m_start': load_start[0],
    'load_avg_1m_end': load_end[0],
    'cpu_use_ours_process': use,
    'cpu_use_machine': machine,
    'warning': warning,
  }


def _print_human(r: dict):
  pct = lambda x: f'{100 * x:.0f}%'  # noqa: E731
  print(
    f'setting: ViT-Ti/16 {r["encoder"]}, predictor {r["predictor"]}, batch {r["batch"]}, '
    f'float32; tokens per image: {r["k_ctx"]} context (mean valid {r["valid_ctx_mean"]:.1f}), '
    f'{r["num_targets"]} x {r["k_tgt"]} target'
  )
  print(
    f'official (torch {r["torch_version"]}, {r["torch_threads"]} threads): checkpointed attn/mlp '
    f'{r["checkpoint_blocks"]}; params {r["params_official"]}'
  )
  print(
    f'ours (jax {r["jax_version"]}): scan_blocks={r["our_scan_blocks"]}, remat={r["our_remat"]}; '
    f'params {r["params_ours"]}; compile {r["our_compile_s"]:.1f} s'
  )
  print(
    f'loss at step 0: official {r["loss_step0"]["official"]:.4f}, ours '
    f'{r["loss_step0"]["ours"]:.4f} (after the run: {r["loss_last"]["official"]:.4f}, '
    f'{r["loss_last"]["ours"]:.4f})'
  )
  print(
    f'timed: {r["rounds"]} rounds x {r["steps_per_round"]} steps each side, interleaved, '
    f'{r["timed_s"]:.0f} s'
  )
  for name in ('official', 'ours'):
    s = r[name]
    extra = ''
    if name == 'official' and r['checkpoint_blocks']:
      extra = f', {s["executed_gflops"]:.1f} executed (recomputation counted)'
    print(
      f'  {name:<8} median {s["step_s_median"]:.3f} s (min {s["step_s_min"]:.3f}, max '
      f'{s["step_s_max"]:.3f}); {s["images_per_s"]:.2f} images/s; '
      f'{s["achieved_gflops"]:.1f} useful GFLOP/s{extra}'
    )
  print(
    f'ratio ours / official images/s: {r["ratio_ours_over_official_images_per_s"]:.3f} '
    '(> 1: ours is faster); per round: '
    + ', '.join(f'{x:.2f}' for x in r['ratio_per_round'])
    + f' (median {r["ratio_median_of_rounds"]:.3f})'
  )
  peaks = r['matmul_peak_gflops_f32']
  print(
    f'FLOPs: {r["useful_gflop_per_step"]:.1f} useful GFLOP/step (train_step.model_flops); official '
    f'executes {r["official_executed_gflop_per_step"]:.1f}. f32 2048^3 matmul peak: XLA '
    f'{peaks["xla"]:.1f}, torch {peaks["torch"]:.1f} GFLOP/s'
  )
  machine = r['cpu_use_machine']
  line = (
    f'machine: {r["cpu_count"]} cores; load average (1 min) {r["load_avg_1m_start"]:.2f} at start, '
    f'{r["load_avg_1m_end"]:.2f} at end; this process used '
    f'{pct(r["cpu_use_ours_process"]["official"])} (official) / '
    f'{pct(r["cpu_use_ours_process"]["ours"])} (ours) of all cores'
  )
  if machine:
    line += f'; whole machine busy {pct(machine["busy"])}, steal {pct(machine["steal"])}'
  print(line)
  if r['warning']:
    print('WARNING: ' + r['warning'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if min(_ROUNDS.value, _STEPS.value, _WARMUP.value) < 1:
    raise app.UsageError('--rounds, --steps_per_round and --warmup must be at least 1.')
  threads = _THREADS.value or os.cpu_count()
  result = run(
    _CONFIG.value, _ROUNDS.value, _STEPS.value, _WARMUP.value, _CHECKPOINT.value, threads
  )
  _print_human(result)
  print('RESULT ' + json.dumps(result))


if __name__ == '__main__':
  app.run(main)
