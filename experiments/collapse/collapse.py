r"""StoP's collapse argument, measured: does an untied A' shrink while the tied A does not?

Paper Sec. 3 and App. A: if the masked tokens get noise through their own matrix A'
(m_j = A' n_j + psi_j + m~), the predictor can drop the noise by learning A' -> 0, and StoP
becomes plain I-JEPA. Tying A' to the context projection A (`stop.mode='masked'`,
m_j = A n_j + b + psi_j, c_i = A s_i + b + psi_i) forbids that: shrinking A would also erase
the context. This script trains the same small model in both modes, on the same batches and
masks, and tracks ||A||_F (`params['predictor']['predictor_embed']['kernel']`) and, untied,
||A'||_F (`params['predictor']['noise_proj']['kernel']`).

Command (from the repo root; CPU is enough):
  python experiments/collapse/collapse.py
  python experiments/collapse/collapse.py --sigmas=1.0 --steps=600 --seed=1

Measured results and how to read them: experiments/collapse/RESULTS.md.

Setting: sklearn digits (8x8, bilinear to 32x32, grey to RGB, ImageNet-normalised; no download),
ViT 64 wide, 2 deep, 4 heads, patch 4 (an 8x8 grid); predictor 32 wide, 2 deep, 4 heads;
batch 32; AdamW at a constant lr 1e-3 (no warmup, no decay of the lr) and weight decay 0, so
no shrinkage can come from decay: whatever happens to A' comes from the loss alone.
"""

from __future__ import annotations

import json
import os
import sys
import time

# `python experiments/collapse/collapse.py` puts this folder on the path, not the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from stop_jax import config as config_lib  # noqa: E402
from stop_jax import models  # noqa: E402
from stop_jax.data import masking  # noqa: E402
from stop_jax.train import step as step_lib  # noqa: E402
from stop_jax.train.schedules import Schedules  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps per run.')
_SIGMAS = flags.DEFINE_list('sigmas', ['0.25', '1.0'], 'Noise standard deviations to try.')
_LOG_EVERY = flags.DEFINE_integer('log_every', 50, 'Steps between table rows.')
_SEED = flags.DEFINE_integer('seed', 0, 'Init, batch-order and mask seed (shared by both modes).')

BATCH = 32
PROBE_IMAGES = 128
# stop_jax.data.augment's ImageNet statistics, repeated so this script does not import
# TensorFlow.
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


def collapse_config(mode: str, sigma: float, steps: int, seed: int) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.seed = seed
  c.model.variant = 'tiny'
  c.model.width, c.model.depth, c.model.num_heads = 64, 2, 4
  c.model.image_size, c.model.patch_size = 32, 4
  c.predictor.width, c.predictor.depth, c.predictor.num_heads = 32, 2, 4
  # Same math; at depth 2 unrolled blocks compile in half the time and step faster on CPU.
  c.model.scan_blocks = False
  c.stop.mode, c.stop.sigma = mode, sigma
  c.mask.min_keep = 4  # An 8x8 grid: a target block has ~10 tokens, so 10 cannot hold.
  c.data.source = 'digits'
  c.data.global_batch_size = BATCH
  # One 'epoch' of `steps` steps: the EMA horizon is the run; the lr is flat at 1e-3.
  c.optim.epochs, c.optim.warmup_epochs = 1, 0.0
  c.optim.start_lr = c.optim.lr = c.optim.final_lr = 1e-3
  c.optim.weight_decay = c.optim.final_weight_decay = 0.0
  c.total_steps = steps
  return config_lib.lock(c)


def digits_images(size: int) -> np.ndarray:
  """All 1,797 sklearn digits as float32 [N, size, size, 3], ImageNet-normalised."""
  from sklearn.datasets import load_digits

  gray = jnp.asarray(load_digits().images / 16.0, jnp.float32)  # [N, 8, 8] in [0, 1]
  up = jnp.clip(jax.image.resize(gray, (gray.shape[0], size, size), 'bilinear'), 0.0, 1.0)
  rgb = jnp.repeat(up[..., None], 3, axis=-1)
  mean = jnp.asarray(MEAN_RGB, jnp.float32)
  std = jnp.asarray(STD_RGB, jnp.float32)
  return np.asarray((rgb - mean) / std)


def _fro(x) -> float:
  return float(jnp.linalg.norm(x))


def train_run(config, images: np.ndarray, log_every: int) -> list[dict]:
  """Trains with the real jitted step; returns one row per `log_every` steps (and step 0).

  Each row, at the params of that step (ratios relative to ||psi||, the norm of a predictor
  position embedding, sqrt(d_p / 2) for sin-cos):
    A, A_prime   ||A||_F, and ||A'||_F when untied;
    A_srank      stable rank of A, ||A||_F^2 / ||A||_2^2: A can shrink off the span of the
                 context features without touching the context, which lowers it;
    noise        RMS ||A n_j|| / ||psi|| = sigma ||A_noise||_F / ||psi|| (exact in expectation;
                 A_noise = A tied, A' untied): how much noise the masked tokens carry;
    signal       RMS over probe tokens of ||A s_i|| / ||psi||, s_i the context encoder's output:
                 how much image content the context tokens carry;
    s_norm       RMS ||s_i||: the encoder's output scale (its final LayerNorm has a learned scale);
    spread       std over probe images of the layer-normed targets, averaged over tokens and
                 channels (0 = targets no longer depend on the image);
    loss         mean training loss over the steps since the previous row.
  """
  config_lib.validate(config)
  steps = config.total_steps
  sigma = float(config.stop.sigma)
  encoder, predictor = models.build_encoder(config), models.build_predictor(config)
  tx = step_lib.make_optimizer(config)
  schedules = Schedules.from_config(config, steps_per_epoch=steps)
  state = step_lib.create_train_state(encoder, predictor, tx, config, jax.random.key(config.seed))
  step_fn = jax.jit(
    step_lib.make_train_step(config, encoder, predictor, tx, schedules), donate_argnums=(0,)
  )
  spec = masking.spec_from_config(config)
  order = np.random.default_rng(config.seed)  # same batches in every run with this seed
  rng = jax.random.key(config.seed + 1)
  untied = config.stop.mode == 'untied'
  probe = images[:PROBE_IMAGES]  # fixed, so rows compare across steps and modes
  psi_norm = float(np.sqrt(config.predictor.width / 2))  # sin^2 + cos^2 = 1 per channel pair

  @jax.jit
  def probe_stats(params, target_params):
    s = encoder.apply({'params': params['encoder']}, probe)  # [P, N, d_e], every token
    a = params['predictor']['predictor_embed']['kernel']  # [d_e, d_p]
    a_noise = params['predictor']['noise_proj']['kernel'] if untied else a
    targets = step_lib.target_features(encoder, target_params, probe)  # [P, N, d_e]
    rms = lambda x: jnp.sqrt(jnp.mean(jnp.sum(jnp.square(x), axis=-1)))  # noqa: E731
    return {
      'A': jnp.linalg.norm(a),
      'A_srank': jnp.sum(jnp.square(a)) / jnp.square(jnp.linalg.norm(a, 2)),
      'A_prime': jnp.linalg.norm(a_noise) if untied else jnp.nan,
      'noise': sigma * jnp.linalg.norm(a_noise) / psi_norm,
      'signal': rms(s @ a) / psi_norm,
      's_norm': rms(s),
      'spread': jnp.mean(jnp.std(targets, axis=0)),
    }

  def row(step, losses):
    stats = {k: float(v) for k, v in probe_stats(state.params, state.target_params).items()}
    if not untied:
      stats['A_prime'] = None
    return {'step': step, **stats, 'loss': float(np.mean(losses)) if losses else None}

  rows, losses = [row(0, [])], []
  for step in range(steps):
    idx = order.integers(0, len(images), BATCH)
    batch = {'image': images[idx], **masking.sample_masks(spec, config.seed, step, BATCH)}
    state, metrics = step_fn(state, batch, rng)
    losses.append(metrics['loss'])
    if (step + 1) % log_every == 0 or step + 1 == steps:
      rows.append(row(step + 1, [float(x) for x in losses]))
      losses = []
  return rows


def _fmt(x, spec='.3f') -> str:
  return '-' if x is None else format(x, spec)


_COLUMNS = (
  ('||A||', 7, 'A'),
  ('srank', 6, 'A_srank'),
  ("||A'||", 7, 'A_prime'),
  ('noise', 6, 'noise'),
  ('signal', 6, 'signal'),
  ('|s|', 6, 's_norm'),
  ('spread', 6, 'spread'),
  ('loss', 6, 'loss'),
)


def print_table(sigma: float, tied: list[dict], untied: list[dict]):
  print(
    f'\nsigma = {sigma}. srank = stable rank of A; noise = sigma ||A_noise||_F / ||psi||; '
    'signal = RMS ||A s|| / ||psi||; |s| = RMS norm of the encoder features s; spread = std over '
    'images of the targets; loss = mean since the previous row.'
  )
  tied_cols = [c for c in _COLUMNS if c[2] != 'A_prime']
  head = [f'{"tied (masked)":^{sum(w + 1 for _, w, _ in tied_cols) - 1}}']
  head.append(f'{"untied":^{sum(w + 1 for _, w, _ in _COLUMNS) - 1}}')
  print((f'{"":>5} | ' + ' | '.join(head)).rstrip())
  names = [' '.join(n.rjust(w) for n, w, _ in cols) for cols in (tied_cols, _COLUMNS)]
  print(f'{"step":>5} | ' + ' | '.join(names))
  for t, u in zip(tied, untied, strict=True):
    cells = [
      ' '.join(_fmt(r[k]).rjust(w) for _, w, k in cols)
      for r, cols in ((t, tied_cols), (u, _COLUMNS))
    ]
    print(f'{t["step"]:>5} | ' + ' | '.join(cells))
  ratio = lambda rows, key: rows[-1][key] / rows[0][key]  # noqa: E731
  nts = lambda rows, i: rows[i]['noise'] / rows[i]['signal']  # noqa: E731
  print(
    f'final / initial: ||A|| tied {ratio(tied, "A"):.3f}; untied ||A|| {ratio(untied, "A"):.3f}, '
    f"||A'|| {ratio(untied, 'A_prime'):.3f}"
  )
  print(
    f'noise / signal: tied {nts(tied, 0):.3f} -> {nts(tied, -1):.3f}; untied '
    f'{nts(untied, 0):.3f} -> {nts(untied, -1):.3f}'
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  steps, log_every, seed = _STEPS.value, _LOG_EVERY.value, _SEED.value
  images = digits_images(32)
  print(
    f'collapse: {steps} steps per run, batch {BATCH}, lr 1e-3 constant, weight decay 0, '
    f'seed {seed}; {len(images)} digits at 32x32'
  )
  results = []
  for sigma in (float(s) for s in _SIGMAS.value):
    t0 = time.perf_counter()
    runs = {
      mode: train_run(collapse_config(mode, sigma, steps, seed), images, log_every)
      for mode in ('masked', 'untied')
    }
    print_table(sigma, runs['masked'], runs['untied'])
    print(f'({time.perf_counter() - t0:.1f} s for both runs)')
    results.append(
      {'sigma': sigma, 'steps': steps, 'tied': runs['masked'], 'untied': runs['untied']}
    )
  print('RESULT ' + json.dumps(results))


if __name__ == '__main__':
  app.run(main)
