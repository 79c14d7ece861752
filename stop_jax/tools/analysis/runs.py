"""Trained runs read back for analysis, and the tiny run a notebook trains when it has none.

`load_run` rebuilds a run's locked config from its `config.json` and reads its checkpoint;
`ensure_tiny_run` trains the offline tiny config for a few steps when a notebook has no run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.models.layers import sincos_2d
from stop_jax.runtime import checkpointing, fileio


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a finished checkpoint (orbax names them by step)."""
  directory = os.path.join(workdir, 'checkpoints')
  return fileio.isdir(directory) and any(name.isdigit() for name in fileio.listdir(directory))


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run read back for analysis: host arrays, no optimiser state."""

  workdir: str
  config: ml_collections.ConfigDict
  step: int
  params: dict  # {'encoder': ..., 'predictor': ...}
  target_params: dict  # The EMA target encoder.

  @property
  def encoder(self) -> nn.Module:
    return models.build_encoder(self.config)

  @property
  def predictor(self) -> nn.Module:
    return models.build_predictor(self.config)

  @property
  def grid(self) -> tuple[int, int]:
    side = self.config.model.image_size // self.config.model.patch_size
    return side, side

  def projection(self) -> tuple[np.ndarray, np.ndarray]:
    """StoP's tied A and its bias b (the mask token): float32 [d_e, d_p] and [d_p]."""
    embed = self.params['predictor']['predictor_embed']
    return np.asarray(embed['kernel'], np.float32), np.asarray(embed['bias'], np.float32)

  def positions(self) -> np.ndarray:
    """The predictor's position table psi, float32 [h * w, d_p] (learned or fixed sin-cos)."""
    if self.config.predictor.pos_embed == 'learned':
      return np.asarray(self.params['predictor']['predictor_pos_embed'], np.float32)
    return sincos_2d(*self.grid, self.config.predictor.width)


def load_run(workdir: str, step: int | None = None) -> Run:
  """Config and checkpoint (the latest one, or `step`) of a run directory."""
  config = config_lib.load_json(workdir)
  step, tree = checkpointing.load_checkpoint(workdir, step)
  # Params may carry logical-partitioning boxes; analysis only needs the arrays.
  params = nn.meta.unbox(tree['params'])
  return Run(workdir, config, int(step), params, nn.meta.unbox(tree['target_params']))


def tiny_config(
  steps: int, overrides: Mapping[str, Any] | None = None, log_every_steps: int = 5
) -> ml_collections.ConfigDict:
  """configs/tiny.py stopped after `steps` steps (schedules unchanged), probe off.

  Args:
    steps: training steps.
    overrides: dotted keys, e.g. {'stop.sigma': 0.5}.
    log_every_steps: metrics.jsonl granularity (short runs need more than the default).
  """
  if steps < 1:
    raise ValueError(f'steps={steps}: a run needs at least one step.')
  config = config_lib.load_config_file('tiny.py', f'steps={steps}')
  config.eval.probe = False
  config.log_every_steps = log_every_steps
  config.checkpoint.every_steps = 0  # Only the final state: what the analysis reads.
  for dotted, value in (overrides or {}).items():
    *groups, key = dotted.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[key] = tuple(value) if isinstance(value, list) else value
  return config


def ensure_tiny_run(
  workdir: str, steps: int = 40, overrides: Mapping[str, Any] | None = None
) -> bool:
  """Trains `tiny_config(steps, overrides)` into `workdir` unless it already has a checkpoint.

  Returns:
    True when it trained, False when an existing run was kept.
  """
  if has_checkpoint(workdir):
    return False
  # The trainer pulls in TensorFlow (input pipeline): imported only when a run is trained.
  from stop_jax.train import loop

  loop.train_and_evaluate(tiny_config(steps, overrides), workdir)
  return True
