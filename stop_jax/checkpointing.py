"""Orbax checkpoints of the whole train state in `<workdir>/checkpoints`.

Orbax writes each step into a temporary directory and renames it only when complete, so an
interrupted save never becomes the latest checkpoint. Saves are asynchronous: training goes on
while the previous state is written. Rerunning the same command resumes from the latest one.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves every `config.checkpoint.every_steps` steps and at the end; keeps the last k."""

  def __init__(self, workdir: str, config):
    self.every = config.checkpoint.every_steps
    self.manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep, create=True, enable_async_checkpointing=True
      ),
    )

  def restore_latest(self, abstract_state, shardings):
    """The latest complete checkpoint placed on `shardings`, or None for a fresh run."""
    step = self.manager.latest_step()
    if step is None:
      return None
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    logging.info('resuming from checkpoint at step %d', step)
    return self.manager.restore(step, args=ocp.args.StandardRestore(target))

  def maybe_save(self, step: int, state, final: bool = False):
    if final or (self.every > 0 and step % self.every == 0):
      self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self):
    self.manager.wait_until_finished()


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """Reads a run's checkpoint as plain host arrays, for tools (export, evaluation, notebooks).

  Returns:
    (step, tree) where tree has the TrainState fields as keys: 'step', 'params' ({'encoder',
    'predictor'}), 'target_params', 'opt_state'.
  Raises:
    FileNotFoundError naming the directory when there is no checkpoint.
  """
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  steps = manager.all_steps() if os.path.isdir(directory) else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}: train with --workdir={workdir} first.')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} in {directory}; have {sorted(steps)}.')
  tree = manager.restore(step, args=ocp.args.StandardRestore())
  return step, jax.tree.map(lambda x: x if isinstance(x, int) else jax.device_get(x), tree)
