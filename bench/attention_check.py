"""Do the attention kernels agree on this backend? Loss and grads of one real train step.

    python bench/attention_check.py            # einsum vs xla (CPU); + cudnn on a GPU

Runs the ViT-Ti/16 StoP step (bf16 on GPU, fp32 on CPU) with each `model.attention` kernel from
the same state, batch and key, and prints the loss and the relative gradient difference to the
einsum reference. Context and target slots include padding, so the cuDNN path (which masks by
sequence lengths after the predictor's reordering) is checked where it differs most.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from stop_jax import models  # noqa: E402
from stop_jax.train import step as step_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as bench_step  # noqa: E402


def loss_and_grads(config, batch):
  encoder, predictor = models.build_encoder(config), models.build_predictor(config)
  params = step_lib.init_params(encoder, predictor, config, jax.random.key(0))
  target = params['encoder']
  feats = step_lib.target_features(encoder, target, batch['image'])
  targets = step_lib.gather_targets(feats, batch['tgt_idx'])

  def loss_fn(p):
    ctx = encoder.apply(
      {'params': p['encoder']}, batch['image'], batch['ctx_idx'], batch['ctx_valid']
    )
    pred, _ = predictor.apply(
      {'params': p['predictor']},
      ctx,
      batch['ctx_idx'],
      batch['tgt_idx'],
      batch['ctx_valid'],
      batch['tgt_valid'],
      rngs={'stop': jax.random.key(3)},
      mutable=['stats', 'intermediates'],
    )
    return step_lib.prediction_loss(pred, targets, batch['tgt_valid'])

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def main():
  gpu = jax.default_backend() == 'gpu'
  config = bench_step.vit_ti16_config()
  config.data.global_batch_size = 8
  config.mask.num_context_tokens = 70  # more slots than most masks fill: real padding
  config.mask.num_target_tokens = 40
  if gpu:
    config.model.dtype = 'bfloat16'
  batch = bench_step.make_batch(config, 8)
  impls = ['einsum', 'xla'] + (['cudnn'] if gpu else [])
  results, ref = {}, None
  for impl in impls:
    config.model.attention = impl
    loss, grads = loss_and_grads(config, batch)
    g = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(grads)])
    if ref is None:
      ref = (float(loss), g)
    rel = float(np.linalg.norm(g - ref[1]) / np.linalg.norm(ref[1]))
    results[impl] = {'loss': float(loss), 'grad_rel_diff_vs_einsum': rel}
    print(f'{impl:>7}: loss {float(loss):.6f}, grad rel diff vs einsum {rel:.2e}')
  print(
    'RESULT '
    + json.dumps({'backend': jax.default_backend(), 'dtype': config.model.dtype, **results})
  )


if __name__ == '__main__':
  main()
