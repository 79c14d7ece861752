"""The training loop: the side-effecting edge around the pure step in `train.py`.

`train_and_evaluate(config, workdir)` is what `main.py`, the tests and notebooks call. It
validates the config, builds the mesh, creates the state already sharded, streams batches
into global arrays, runs the jitted step, logs, checkpoints, and finishes with a linear probe
of the frozen target encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stop_jax import checkpointing, config_base, input_pipeline, masking, models, probe, train
from stop_jax.metric_logging import MetricLogger
from stop_jax.schedules import Schedules

# Batch axis of every array in a batch: the target index arrays are [n, B, K].
BATCH_AXIS = {'image': 0, 'ctx_idx': 0, 'ctx_valid': 0, 'tgt_idx': 1, 'tgt_valid': 1}


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Numbers derived once from the config and the data, logged and saved with the config."""

  num_train_examples: int
  steps_per_epoch: int
  total_steps: int
  mask_spec: masking.MaskSpec


def plan_run(config: ml_collections.ConfigDict) -> RunPlan:
  n = input_pipeline.num_train_examples(config)
  steps_per_epoch = max(1, n // config.data.global_batch_size)
  total = config.total_steps
  if total <= 0:
    total = int(config.optim.epochs * steps_per_epoch)
  return RunPlan(n, steps_per_epoch, total, masking.spec_from_config(config))


def make_mesh(config) -> jax.sharding.Mesh:
  n = jax.device_count()
  data = config.mesh.data if config.mesh.data > 0 else n
  if data != n:
    raise config_base.ConfigError(
      f'config.mesh.data={config.mesh.data} does not match the {n} available devices '
      '(use -1 for all of them).'
    )
  # Auto axes: XLA propagates shardings through the step (we annotate inputs and outputs).
  return jax.make_mesh((data,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def batch_shardings(mesh) -> dict:
  return {k: NamedSharding(mesh, P(*([None] * axis + ['data']))) for k, axis in BATCH_AXIS.items()}


def to_global(local: dict, shardings: dict) -> dict:
  """This process's share of a batch -> one global jax.Array per key."""
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()
  }


def save_config(config, plan: RunPlan, workdir: str):
  """The resolved config and plan next to the run, for humans and for resuming."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, 'plan.json'), 'w') as f:
    json.dump(
      {**dataclasses.asdict(plan), 'mask_spec': dataclasses.asdict(plan.mask_spec)}, f, indent=2
    )


def encoder_features(encoder, params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Average-pooled last-layer features of a frozen encoder. images [N, H, W, 3] -> [N, D]."""
  fn = jax.jit(lambda p, x: jnp.mean(encoder.apply({'params': p}, x), axis=1))
  out = []
  for i in range(0, len(images), batch_size):
    chunk = images[i : i + batch_size]
    pad = batch_size - len(chunk)  # one shape for every call: one compilation
    x = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
    out.append(np.asarray(fn(params, x))[: len(chunk)])
  return np.concatenate(out)


def run_probe(config, encoder, target_params, init_rng) -> dict:
  """Linear probe of the target encoder, next to the same probe on a random-init encoder."""
  e = config.eval
  train_x, train_y = input_pipeline.load_eval_arrays(config, 'train', e.probe_max_examples)
  test_x, test_y = input_pipeline.load_eval_arrays(config, 'test', e.probe_max_examples)
  num_classes = int(max(train_y.max(), test_y.max()) + 1)
  results = {}
  candidates = [('pretrained', target_params)]
  if e.probe_random_init:
    size = config.model.image_size
    random_params = encoder.init(init_rng, jnp.zeros((1, size, size, 3)))['params']
    candidates.append(('random_init', random_params))
  for name, params in candidates:
    res = probe.linear_probe(
      encoder_features(encoder, params, train_x),
      train_y,
      encoder_features(encoder, params, test_x),
      test_y,
      num_classes=num_classes,
      l2_grid=tuple(e.probe_l2),
    )
    results[name] = res
    logging.info(
      'linear probe (%s encoder, avg-pooled last layer): test accuracy %.2f%% (l2 %g, %d train / %d test)',
      name,
      100 * res['accuracy'],
      res['l2'],
      res['num_train'],
      res['num_test'],
    )
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains with I-JEPA + StoP, then probes the target encoder. Returns a summary dict."""
  config_base.validate(config, num_devices=jax.device_count())
  plan = plan_run(config)
  is_main = jax.process_index() == 0
  if is_main:
    save_config(config, plan, workdir)
  logging.info(
    'plan: %d examples, %d steps/epoch, %d steps, tokens per image: %d context, %d x %d target',
    plan.num_train_examples,
    plan.steps_per_epoch,
    plan.total_steps,
    plan.mask_spec.num_context_tokens,
    plan.mask_spec.num_targets,
    plan.mask_spec.num_target_tokens,
  )

  mesh = make_mesh(config)
  encoder, predictor = models.build_encoder(config), models.build_predictor(config)
  tx = train.make_optimizer(config)
  schedules = Schedules.from_config(config, plan.steps_per_epoch)
  init_rng, step_rng, probe_rng = jax.random.split(jax.random.key(config.seed), 3)

  # Sharded creation: shapes first, then init directly into the target sharding.
  create = lambda r: train.create_train_state(encoder, predictor, tx, config, r)  # noqa: E731
  abstract = jax.eval_shape(create, init_rng)
  state_sharding = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
  replicated = NamedSharding(mesh, P())
  batch_sh = batch_shardings(mesh)

  ckpt = checkpointing.Checkpointer(workdir, config)
  state = ckpt.restore_latest(abstract, state_sharding)
  if state is None:
    state = jax.jit(create, out_shardings=state_sharding)(init_rng)
  start_step = int(state.step)
  n_params = sum(x.size for x in jax.tree.leaves(state.params['encoder']))
  n_pred = sum(x.size for x in jax.tree.leaves(state.params['predictor']))
  logging.info(
    'encoder %.2fM params, predictor %.2fM params; starting at step %d',
    n_params / 1e6,
    n_pred / 1e6,
    start_step,
  )

  step_fn = jax.jit(
    train.make_train_step(config, encoder, predictor, tx, schedules),
    donate_argnums=(0,),
    in_shardings=(state_sharding, batch_sh, replicated),
    out_shardings=(state_sharding, replicated),
  )
  batches = input_pipeline.create_train_iterator(config, plan.mask_spec, start_step=start_step)
  logger = MetricLogger(workdir, plan.total_steps, config.data.global_batch_size, write=is_main)
  t0 = time.perf_counter()
  for step in range(start_step, plan.total_steps):
    batch = to_global(next(batches), batch_sh)
    state, metrics = step_fn(state, batch, step_rng)
    if step == start_step:
      jax.block_until_ready(metrics)
      logging.info('first step (with compilation) took %.1fs', time.perf_counter() - t0)
      logger.start(step + 1)
    logger.flush_pending()  # the previous logging step's metrics, fetched one step late
    done = step + 1
    if done % config.log_every_steps == 0 or done == plan.total_steps:
      logger.push(done, metrics)
    ckpt.maybe_save(done, state, final=done == plan.total_steps)
  last_metrics = logger.flush_pending()
  ckpt.wait()

  summary = {'steps': plan.total_steps, 'final_metrics': last_metrics}
  if config.eval.probe:
    summary['probe'] = run_probe(config, encoder, state.target_params, probe_rng)
    for name, res in summary['probe'].items():
      logger.write_summary(plan.total_steps, res, prefix=f'probe_{name}')
  logger.close()
  if is_main:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=float)
  return summary
