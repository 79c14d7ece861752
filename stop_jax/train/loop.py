"""The training loop: the side-effecting edge around the pure step in `step.py`.

`train_and_evaluate(config, workdir)` is what `main.py`, the tests and notebooks call. It
validates the config, plans the run (`plan.py`), builds the mesh and the sharded step
(`setup.py`), restores or creates the state, streams batches into global arrays, runs the
compiled step, logs, checkpoints, guards against non-finite and diverging steps (`guard.py`),
runs the evaluators of `eval/evaluators.py` (the periodic k-NN, the final linear probe) and writes
summary.json (`workdir.py`). The workdir may be local, shared or an object store (gs://...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from stop_jax import config as config_lib
from stop_jax.data import prefetch, train_stream
from stop_jax.eval import evaluators as evaluators_lib
from stop_jax.runtime import checkpointing, fileio, sharding
from stop_jax.runtime.metric_logging import MetricLogger
from stop_jax.train import guard as guard_lib
from stop_jax.train import plan as plan_lib
from stop_jax.train import setup
from stop_jax.train import workdir as workdir_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains with I-JEPA + StoP, then runs the final evaluators. Returns a summary dict.

  Rerunning with the same workdir resumes from the latest good checkpoint. After a SIGTERM
  the run saves, returns {'preempted': True, ...} and skips the final evaluators. A run that
  has nothing left to do (`workdir.finished_summary`) is not touched: it prints "already
  complete at step N (summary: PATH)" and returns summary.json's content plus
  {'already_complete': True, 'message': that line}.
  """
  config_lib.validate(config, num_devices=jax.device_count())
  is_main = jax.process_index() == 0
  # Shared-workdir check and config check on every process, before anything is written.
  workdir_lib.check(config, workdir)
  init_rng, step_rng, probe_rng = jax.random.split(jax.random.key(config.seed), 3)
  evaluators = evaluators_lib.for_training(config, probe_rng)
  final = [ev for ev in evaluators if not ev.every_steps]  # once, at the end
  finished = workdir_lib.finished_summary(config, workdir, [ev.name for ev in final])
  if finished is not None:
    return _already_complete(workdir, finished)
  plan = plan_lib.plan_run(config)
  workdir_lib.save(config, plan, workdir)  # process 0 writes config.json and plan.json
  plan_lib.log_plan(plan)
  sharded = setup.make_sharded_step(config, sharding.make_mesh(config), plan.schedules)
  step_rng = setup.replicate(step_rng, sharded.replicated)

  # Whatever happens, no orbax threads or open event files stay behind (notebooks, tests).
  with contextlib.ExitStack() as stack:
    ckpt = stack.enter_context(contextlib.closing(checkpointing.Checkpointer(workdir, config)))
    state, meta = _restore_or_create(ckpt, sharded, init_rng)
    start = int(state.step)
    # metrics.jsonl is cut back to the step resumed from; at the end (only the final
    # evaluators left to run) their earlier rows there are replaced.
    rerun = [p for ev in final for p in (f'{ev.name}/', f'{ev.name}_')]
    logger = MetricLogger(
      workdir,
      plan.total_steps,
      config.data.global_batch_size,
      write=is_main,
      start_step=start,
      rerun_prefixes=tuple(rerun) if start >= plan.total_steps else (),
    )
    stack.enter_context(contextlib.closing(logger))
    # The non-finite and divergence guard (resumed from the checkpoint's meta).
    put = guard_lib.replicated(sharded.replicated)
    guard = guard_lib.StepGuard(config, ckpt, start, meta, put)
    corrupt = train_stream.CorruptImages(meta.get('corrupt_images', 0))  # undecodable images
    run = _Run(config, plan, sharded.encoder, evaluators, step_rng, ckpt, logger, guard, corrupt)
    preempted_at, last_metrics = None, None
    if start < plan.total_steps:  # else: trained already, nothing to compile
      state, preempted_at, last_metrics = _train(run, sharded, state)

    if preempted_at is not None:
      logging.warning(
        'preempted: saved step %d in %s; rerun the same command to resume',
        preempted_at,
        ckpt.directory,
      )
      return {'steps': preempted_at, 'preempted': True, 'final_metrics': last_metrics}
    summary = {
      'steps': plan.total_steps,
      # Nothing run now: the last training row in metrics.jsonl, not null.
      'final_metrics': last_metrics or logger.resumed_metrics or None,
      **guard.summary(),  # skipped steps: non-finite, divergent
      'corrupt_images': corrupt.total(plan.total_steps),
    }
    for ev in final:
      summary[ev.name] = run.evaluate(ev, plan.total_steps, state)
  if is_main:
    # After the checkpointer is closed: the final step is on disk, with all its files.
    summary['final_checkpoint'] = checkpointing.step_fingerprint(workdir, plan.total_steps)
    workdir_lib.write_summary(workdir, summary)
  return summary


def _already_complete(workdir: str, summary: dict) -> dict:
  """The result of rerunning a finished run: one line, and nothing written."""
  path = workdir_lib.summary_path(fileio.resolve(workdir))
  message = f'already complete at step {summary["steps"]} (summary: {path})'
  if jax.process_index() == 0:
    # The run's one result line (stdout, like evaluate's); --config.eval.rerun_final=True
    # runs the final evaluators again.
    print(message, flush=True)
  return {**summary, 'already_complete': True, 'message': message}


def _train(run: _Run, sharded: setup.ShardedStep, state) -> tuple:
  """Compiles the step and runs it from state.step to the end (or a preemption).

  Returns:
    (state, the step a preemption stopped the run at or None, the last logged metrics).
  """
  step_fn = _compile(run.config, sharded, run.plan, start_step=int(state.step))
  # Batches become global arrays on the devices two steps ahead, in a background thread.
  batches = prefetch.prefetch_to_device(
    train_stream.create_train_iterator(
      run.config, run.plan.mask_spec, start_step=int(state.step), corrupt=run.corrupt
    ),
    sharded.batch_shardings,
    size=2,
  )
  watcher = checkpointing.PreemptionWatcher()
  with contextlib.closing(batches), contextlib.closing(watcher):
    state, preempted_at = run.steps(state, step_fn, batches, watcher)
    run.logger.flush_pending()
    last_metrics = run.logger.last_metrics  # the last step's (a save may have fetched them)
    run.ckpt.wait()
  return state, preempted_at, last_metrics


def _restore_or_create(ckpt, sharded: setup.ShardedStep, init_rng) -> tuple:
  """(state, meta): the latest good checkpoint's, else a new state and {}."""
  restored = ckpt.restore_latest(sharded.abstract_state)
  if restored is None:
    return sharded.create(setup.replicate(init_rng, sharded.replicated)), {}
  return restored


def _compile(config, sharded: setup.ShardedStep, plan: plan_lib.RunPlan, start_step: int):
  """The step compiled ahead of time from shapes: a batch of another shape fails loudly instead
  of silently recompiling, and XLA's memory analysis is known before the first step."""
  t = time.perf_counter()
  step_fn = sharded.compile(config, plan.mask_spec)
  logging.info(
    'compiled the train step in %.1fs; starting at step %d', time.perf_counter() - t, start_step
  )
  setup.log_memory(setup.describe_memory(sharded, step_fn))
  return step_fn


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the steps of one run share (built, and closed, by `train_and_evaluate`)."""

  config: ml_collections.ConfigDict
  plan: plan_lib.RunPlan
  encoder: nn.Module
  evaluators: list[evaluators_lib.Evaluator]
  step_rng: jax.Array  # replicated; the step folds in state.step
  ckpt: checkpointing.Checkpointer
  logger: MetricLogger
  guard: guard_lib.StepGuard
  corrupt: train_stream.CorruptImages

  def steps(self, state, step_fn, batches, watcher) -> tuple:
    """Steps from state.step to plan.total_steps, logging, evaluating and saving on the way.

    Returns:
      (state, the step a preemption stopped the run at, or None).
    """
    total, start_step = self.plan.total_steps, int(state.step)
    t0 = time.perf_counter()
    preempted_at = None
    for step in range(start_step, total):
      # The guard's limits for this step (from the steps it checked): over them, the update
      # is dropped inside the step.
      state, metrics = step_fn(state, next(batches), self.step_rng, self.guard.limits(step + 1))
      done = step + 1
      if step == start_step:
        jax.block_until_ready(metrics)
        logging.info('first step took %.1fs', time.perf_counter() - t0)
        self.logger.start(done)
      self.guard.push(done, metrics)  # checks the previous step: waits only for that one
      self.logger.flush_pending()  # the previous logging step's metrics, fetched one step late
      if done % self.config.log_every_steps == 0 or done == total:
        self.logger.push(done, metrics)
      if watcher.reached(done):
        preempted_at = done
      for ev in self.evaluators:
        if ev.every_steps and done % ev.every_steps == 0:
          self.evaluate(ev, done, state)
      if done == total or preempted_at is not None or self.ckpt.due(done):
        self.guard.flush()  # never save past an unnoticed bad step
        # Object-store workdirs: metrics.jsonl holds every step up to the checkpoint before it
        # can become the one a resume starts from (a no-op locally).
        self.logger.sync()
        self.ckpt.save(done, state, self.checkpoint_meta(done))
      if preempted_at is not None:
        break
    self.guard.flush()
    return state, preempted_at

  def evaluate(self, ev, step: int, state) -> dict:
    """Runs one evaluator on the target encoder; logs each group as `name` or `name_group`."""
    results = ev(self.encoder, state.target_params)
    for group, metrics in results.items():
      prefix = ev.name if not group else f'{ev.name}_{group}'
      self.logger.write_summary(step, metrics, prefix=prefix)
    return results

  def checkpoint_meta(self, step: int) -> dict:
    # The data position is the step (the pipeline is a function of it); stored to be explicit.
    data = self.config.data
    return {
      'step': step,
      'examples_seen': step * data.global_batch_size,
      'data': {k: data[k] for k in ('source', 'name', 'train_split', 'global_batch_size')},
      'seed': self.config.seed,
      'step_key': np.asarray(jax.random.key_data(self.step_rng)).tolist(),
      **self.guard.meta(),  # skipped counts and the divergence statistics
      'corrupt_images': self.corrupt.total(step),
    }
