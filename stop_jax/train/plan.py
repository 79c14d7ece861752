"""The numbers of a run, derived once from the config and the data: steps, schedules, masks."""

from __future__ import annotations

import dataclasses

import ml_collections
from absl import logging

from stop_jax.data import masking, sources
from stop_jax.train.schedules import Schedules


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What the loop, the step and the checkpoints agree on; saved next to the config (plan.json).

  `schedules` is built here once, from the steps per epoch the data gives, and passed down to
  the step (`setup.make_sharded_step`).
  """

  num_train_examples: int
  steps_per_epoch: int
  total_steps: int
  mask_spec: masking.MaskSpec
  # Per image: slots, mean valid tokens the step sees and the official means
  # (`masking.token_statistics`).
  mask_tokens: dict
  schedules: Schedules
  # What the data source holds per split (`sources.split_counts`): for an image folder the files
  # found, the images among them (the examples) and the non-image files ignored. Images that
  # fail to decode are only known while training: summary.json's `corrupt_images`.
  data: dict = dataclasses.field(default_factory=dict)

  def to_json_dict(self) -> dict:
    """The plan.json content: the fields above but the schedules (the config holds their inputs)."""
    d = dataclasses.asdict(self)
    del d['schedules']
    return d


def plan_run(config: ml_collections.ConfigDict) -> RunPlan:
  """Counts the train split (reads the data source's size) and resolves the run's numbers.

  total_steps = config.total_steps if > 0, else optim.epochs full epochs of the global batch.
  """
  n = sources.num_train_examples(config)
  steps_per_epoch = max(1, n // config.data.global_batch_size)
  total = config.total_steps
  if total <= 0:
    total = int(config.optim.epochs * steps_per_epoch)
  spec = masking.spec_from_config(config)
  return RunPlan(
    n,
    steps_per_epoch,
    total,
    spec,
    masking.token_statistics(spec),
    Schedules.from_config(config, steps_per_epoch),
    {'source': config.data.source, 'splits': sources.split_counts(config)},
  )


def log_plan(plan: RunPlan):
  t = plan.mask_tokens
  logging.info(
    'plan: %d examples, %d steps/epoch, %d steps; tokens per image: %d context slots (%.1f valid'
    ' on average, official %s), %d x %d target slots (%.1f valid per block, official %s)',
    plan.num_train_examples,
    plan.steps_per_epoch,
    plan.total_steps,
    t['context_slots'],
    t['context_valid'],
    _figure(t['official_context']),
    plan.mask_spec.num_targets,
    t['target_slots'],
    t['target_valid'],
    _figure(t['official_target']),
  )
  logging.info('data (%s): %s', plan.data.get('source'), describe_data(plan.data))


def describe_data(data: dict) -> str:
  """'train: 1000 files, 998 images, 2 ignored (a/x.txt, b/y.txt); val: 50000 examples'."""
  parts = []
  for split, c in data.get('splits', {}).items():
    if 'images' in c:
      text = f'{split}: {c["files"]} files, {c["images"]} images, {c["ignored"]} ignored'
      if c['ignored']:
        text += f' ({", ".join(c["ignored_examples"])}{", ..." if c["ignored"] > 5 else ""})'
    else:
      text = f'{split}: {c["examples"]} examples'
    parts.append(text)
  return '; '.join(parts) or 'n/a'


def _figure(value) -> str:
  return 'n/a' if value is None else f'{value:.1f}'
