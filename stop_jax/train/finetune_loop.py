"""Fine-tuning run: `finetune(config, workdir)`, the edge around the pure `finetune_step`.

Loads the target encoder of `config.finetune.init` (a run, an export or a converted official
checkpoint, `eval/load.py`) and takes the architecture from its config; puts a head on it;
trains everything on one mesh (jit + NamedSharding, the params sharded by their logical names
as in pretraining); evaluates test top-1/top-5 every `eval_every_epochs` and at the end; writes
config.json, plan.json, metrics.jsonl, TensorBoard events, orbax checkpoints and summary.json to
the workdir. Rerunning the same command resumes from the latest checkpoint: the batches, the
Mixup/CutMix and drop-path draws are functions of the step, so the resumed run is the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.data import batch as batch_lib
from stop_jax.data import finetune_input, labelled, prefetch
from stop_jax.eval import load as load_lib
from stop_jax.runtime import checkpointing, fileio, sharding
from stop_jax.runtime.metric_logging import MetricLogger
from stop_jax.train import finetune_step as fs
from stop_jax.train import setup
from stop_jax.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class FinetunePlan:
  """The sizes of one fine-tuning run, from the config and the data."""

  num_train: int
  num_classes: int
  image_size: int
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  eval_every_steps: int
  peak_lr: float  # blr * batch / 256

  def to_json_dict(self) -> dict:
    return dataclasses.asdict(self)


def data_specs(config) -> tuple[labelled.EvalData, labelled.EvalData]:
  """(train, test) splits named by config.finetune, at the fine-tuning resolution."""
  f = config.finetune
  size = f.image_size if f.image_size > 0 else config.model.image_size
  offline = f.source in ('digits', 'synthetic')
  common = dict(
    source=f.source,
    name=f.dataset,
    data_dir=f.data_dir,
    image_size=size,
    digits_upscale=config.data.digits_upscale,
    class_split=f.train_split,
  )
  train = labelled.EvalData(
    split='train' if offline else f.train_split, max_examples=f.max_train_examples, **common
  )
  test = labelled.EvalData(
    split='test' if offline else f.test_split,
    max_examples=f.max_test_examples,
    resize_ratio=float(f.resize_ratio),
    **common,
  )
  return train, test


def make_plan(config, train: labelled.EvalData, test: labelled.EvalData) -> FinetunePlan:
  f = config.finetune
  n = finetune_input.num_train_examples(train, f.file_list)
  classes = labelled.num_classes(train)
  if labelled.num_classes(test) != classes:
    raise ValueError(f'train split has {classes} classes, test {labelled.num_classes(test)}.')
  spe = max(1, n // f.batch_size)  # MAE drops the last partial batch of an epoch
  total = config.total_steps if config.total_steps > 0 else max(1, round(f.epochs * spe))
  return FinetunePlan(
    num_train=n,
    num_classes=classes,
    image_size=train.image_size,
    steps_per_epoch=spe,
    total_steps=total,
    warmup_steps=int(f.warmup_epochs * spe),
    eval_every_steps=max(1, round(f.eval_every_epochs * spe)),
    peak_lr=f.blr * f.batch_size / 256,
  )


def resolve_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
  """The fine-tuning config with the init model's `model` group, and the loaded model."""
  f = config.finetune
  if not f.init:
    raise config_lib.ConfigError(
      'config.finetune.init is empty: pass --config.finetune.init=<a pretraining run, an export '
      'or a converted checkpoint>.'
    )
  loaded = load_lib.load_model(f.init, None if f.init_step < 0 else f.init_step)
  config = config.copy_and_resolve_references()
  for key in loaded.config.model.keys():
    config.model[key] = loaded.config.model[key]
  return config_lib.lock(config), loaded


@dataclasses.dataclass
class _Compiled:
  model: fs.Classifier
  mesh: jax.sharding.Mesh
  abstract_state: Any
  create: Any
  step: Any
  evaluate: Any
  batch_sharding: NamedSharding
  encoder_shardings: Any


def build(config, plan: FinetunePlan, mesh) -> _Compiled:
  """The model, the state's shardings (from the logical names) and the jitted functions."""
  f = config.finetune
  encoder = models.build_encoder(config).clone(drop_path=float(f.drop_path))
  model = fs.Classifier(encoder, plan.num_classes, float(f.head_init_std), f.head_norm)
  images = jnp.zeros((1, plan.image_size, plan.image_size, 3), jnp.float32)
  schedule = fs.lr_schedule(plan.peak_lr, f.min_lr, plan.warmup_steps, plan.total_steps)

  def init_variables(rng):
    return model.init(rng, images)  # params boxed: leaves carry logical names

  def init_params(rng):
    return init_variables(rng)['params']

  depth = config_lib.vit_shape(config.model)[1]
  scales = fs.llrd_scales(
    nn.unbox(jax.eval_shape(init_params, jax.random.key(0))), depth, f.layer_decay
  )
  tx = fs.make_optimizer(f, schedule, scales)

  def create(rng, boxed=False):
    variables = init_variables(rng)
    params, stats = variables['params'], variables.get('batch_stats', {})
    state = fs.FinetuneState(jnp.zeros((), jnp.int32), params, tx.init(params), stats)
    return state if boxed else nn.unbox(state)

  boxed = jax.eval_shape(lambda r: create(r, boxed=True), jax.random.key(0))
  state_sh = sharding.tree_shardings(boxed, mesh)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), state_sh
  )
  replicated = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, sharding.batch_spec(0, 1))  # rank-free: P over dim 0
  inner_step = fs.make_train_step(model, tx, f, schedule)
  inner_eval = fs.make_eval_step(model)

  def step(state, batch, rng):
    with sharding.activation_sharding(mesh):
      return inner_step(state, batch, rng)

  def evaluate(params, batch_stats, batch):
    with sharding.activation_sharding(mesh):
      return inner_eval(params, batch_stats, batch)

  return _Compiled(
    model=model,
    mesh=mesh,
    abstract_state=abstract,
    create=jax.jit(create, out_shardings=state_sh),
    step=jax.jit(
      step,
      donate_argnums=(0,),
      in_shardings=(state_sh, batch_sh, replicated),
      out_shardings=(state_sh, replicated),
    ),
    evaluate=jax.jit(
      evaluate,
      in_shardings=(state_sh.params, state_sh.batch_stats, batch_sh),
      out_shardings=replicated,
    ),
    batch_sharding=batch_sh,
    encoder_shardings=state_sh.params['encoder'],
  )


def _place(tree, shardings):
  """Host arrays (the same on every process) into their global shardings, as float32."""

  def one(x, sh):
    x = np.asarray(x, np.float32)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)


def _initial_state(compiled: _Compiled, loaded, config):
  state = compiled.create(jax.random.key(config.seed))
  if config.finetune.random_init:
    logging.info('finetune: random-init encoder (finetune.random_init=True)')
    return state
  params = dict(state.params)
  try:
    params['encoder'] = _place(nn.unbox(loaded.params), compiled.encoder_shardings)
  except ValueError as e:
    raise ValueError(
      f'finetune.init={loaded.path}: its encoder params do not match the model built from its '
      f'config ({e}).'
    ) from e
  logging.info('finetune: encoder from %s (%s, step %s)', loaded.path, loaded.source, loaded.step)
  return state.replace(params=params)


def test_accuracy(compiled: _Compiled, state, test, batch: int) -> dict:
  """{'top1', 'top5', 'num_test'} of the state's model over the whole test split (padding rows
  not counted)."""
  batch = -(-batch // compiled.mesh.size) * compiled.mesh.size
  shardings = dict.fromkeys(('image', 'label', 'valid'), compiled.batch_sharding)
  counts = np.zeros(3, np.int64)  # top-1 hits, top-5 hits, valid rows: global sums
  for b in labelled.eval_batches(test, batch):
    global_batch = batch_lib.to_global(b, shardings)
    counts += np.asarray(compiled.evaluate(state.params, state.batch_stats, global_batch))
  n = max(int(counts[2]), 1)
  return {'top1': counts[0] / n, 'top5': counts[1] / n, 'num_test': int(counts[2])}


def _prepare_workdir(config, plan: FinetunePlan, workdir: str):
  workdir_lib.check_shared(workdir)
  workdir_lib.check_workdir_config(config, workdir)
  workdir_lib.barrier('stop_jax finetune: config.json read')
  if jax.process_index() == 0:
    workdir_lib.save_config(config, plan, workdir)
  workdir_lib.barrier('stop_jax finetune: config.json written')


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes config.finetune.init's encoder; returns (and writes) the summary dict."""
  config_lib.validate(config)
  config, loaded = resolve_config(config)
  config_lib.validate(config, num_devices=jax.device_count())
  train, test = data_specs(config)
  plan = make_plan(config, train, test)
  logging.info('finetune plan: %s', plan)
  _prepare_workdir(config, plan, workdir)
  compiled = build(config, plan, sharding.make_mesh(config))
  f = config.finetune
  rng = setup.replicate(jax.random.key(config.seed + 1), NamedSharding(compiled.mesh, P()))
  with contextlib.ExitStack() as stack:
    ckpt = stack.enter_context(contextlib.closing(checkpointing.Checkpointer(workdir, config)))
    restored = ckpt.restore_latest(compiled.abstract_state)
    if restored is None:
      state, evals = _initial_state(compiled, loaded, config), []
    else:
      state, evals = restored[0], list(restored[1].get('evals', []))
    batches = prefetch.prefetch_to_device(
      finetune_input.train_batches(
        train,
        finetune_input.TrainAugment.from_config(config, plan.image_size),
        f.batch_size,
        config.seed,
        start_step=int(state.step),
        file_list=f.file_list,
      ),
      {'image': compiled.batch_sharding, 'label': compiled.batch_sharding},
      size=2,
    )
    stack.enter_context(contextlib.closing(batches))
    logger = MetricLogger(workdir, plan.total_steps, f.batch_size, write=jax.process_index() == 0)
    stack.enter_context(contextlib.closing(logger))
    watcher = stack.enter_context(contextlib.closing(checkpointing.PreemptionWatcher()))
    state, preempted = _steps(
      config, plan, compiled, state, batches, rng, test, evals, ckpt, logger, watcher
    )
    last = logger.flush_pending()
    ckpt.wait()
  if preempted is not None:
    logging.warning('preempted: saved step %d; rerun the same command to resume', preempted)
    return {'steps': preempted, 'preempted': True}
  summary = {
    'steps': plan.total_steps,
    'init': f.init,
    'random_init': bool(f.random_init),
    'plan': plan.to_json_dict(),
    'final_metrics': last,
    'test': evals[-1] if evals else None,
    'evals': evals,
  }
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, 'summary.json'), summary, indent=2, default=float)
  return summary


def _steps(config, plan, compiled, state, batches, rng, test, evals, ckpt, logger, watcher):
  """Steps from state.step to the end: log, evaluate, save. -> (state, preempted step or None).

  `evals` (the test results so far) grows in place and is saved in every checkpoint's meta.
  """
  f, start = config.finetune, int(state.step)
  for step in range(start, plan.total_steps):
    state, metrics = compiled.step(state, next(batches), rng)
    done = step + 1
    if step == start:
      logger.start(done)
    logger.flush_pending()
    if done % f.log_every_steps == 0 or done == plan.total_steps:
      logger.push(done, metrics)
    if done % plan.eval_every_steps == 0 or done == plan.total_steps:
      result = test_accuracy(compiled, state, test, f.eval_batch_size)
      logger.write_summary(done, result, prefix='finetune_test')
      logging.info(
        'finetune step %d: test top-1 %.4f, top-5 %.4f', done, result['top1'], result['top5']
      )
      evals.append({'step': done, **result})
    preempted = done if watcher.reached(done) else None
    if done == plan.total_steps or preempted is not None or ckpt.due(done):
      logger.sync()
      ckpt.save(done, state, {'step': done, 'seed': config.seed, 'evals': evals})
    if preempted is not None:
      return state, preempted
  return state, None
