"""End-to-end fine-tuning on the tiny run: a few steps, and a resume that equals the
uninterrupted run exactly."""

import json
import os

import jax
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.runtime import checkpointing
from stop_jax.train import finetune_loop


def _config(init: str, steps: int):
  c = config_lib.load_config_file('finetune/tiny.py', f'steps={steps}')
  c.finetune.init = init
  c.finetune.batch_size = 16
  c.finetune.max_test_examples = 32
  c.finetune.eval_batch_size = 32
  c.finetune.eval_every_epochs = 100.0  # only at the end
  # Every random draw on, so each must resume: both mixes, RandAugment, erasing, drop path.
  c.finetune.mixup, c.finetune.cutmix, c.finetune.reprob = 0.2, 1.0, 0.25
  c.finetune.randaug_num_ops = 2
  c.checkpoint.every_steps = 2
  c.log_every_steps = 1
  c.finetune.log_every_steps = 1
  return c


def test_finetune_requires_init():
  with pytest.raises(config_lib.ConfigError, match='finetune.init is empty'):
    finetune_loop.resolve_config(config_lib.load_config_file('finetune/tiny.py'))


@pytest.mark.slow
def test_tiny_finetune_runs_and_resumes_exactly(tiny_run, tmp_path):
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  summary = finetune_loop.finetune(_config(tiny_run, 3), full)
  assert summary['steps'] == 3 and summary['test']['num_test'] == 32
  assert 0 <= summary['test']['top1'] <= 1 and summary['plan']['num_classes'] == 10
  finetune_loop.finetune(_config(tiny_run, 2), part)  # stops at 2 (saved), then resumes
  finetune_loop.finetune(_config(tiny_run, 3), part)
  a = checkpointing.load_checkpoint(full)[1]
  b = checkpointing.load_checkpoint(part)[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  losses = lambda d: {  # noqa: E731
    r['step']: r['loss']
    for r in map(json.loads, open(os.path.join(d, 'metrics.jsonl')))
    if 'loss' in r
  }
  assert losses(full)[3] == losses(part)[3]
  # The encoder started from the run's target encoder, not from random weights.
  run = checkpointing.load_checkpoint(tiny_run)[1]['target_params']
  cfg = config_lib.load_json(full)
  assert cfg.model.width == 64 and cfg.finetune.init == tiny_run
  first = jax.tree.leaves(run['patch_embed'])[0]
  tuned = jax.tree.leaves(a['params']['encoder']['patch_embed'])[0]
  assert np.abs(first - tuned).max() < 0.05 * np.abs(first).max()
