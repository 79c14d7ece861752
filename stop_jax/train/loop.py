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
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.data import batch as batch_lib
from stop_jax.data import masking
from stop_jax.data import pipeline as input_pipeline
from stop_jax.eval import features, knn, logreg
from stop_jax.runtime import checkpointing, sharding
from stop_jax.runtime.metric_logging import MetricLogger
from stop_jax.train import step as step_lib
from stop_jax.train.schedules import Schedules


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


@dataclasses.dataclass
class ShardedStep:
  """Everything the loop and the compile check need: models, shardings and the jitted step."""

  mesh: jax.sharding.Mesh
  encoder: nn.Module
  predictor: nn.Module
  tx: optax.GradientTransformation
  abstract_state: step_lib.TrainState  # ShapeDtypeStructs carrying their shardings
  state_shardings: step_lib.TrainState
  batch_shardings: dict
  create: Callable  # rng -> sharded TrainState, created directly in its sharding
  step: Callable  # jitted (state, batch, rng) -> (state, metrics); state donated

  def lower(self, config, mask_spec):
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
    batch = batch_lib.abstract_batch(config, mask_spec, self.batch_shardings)
    return self.step.lower(self.abstract_state, batch, rng)

  def compile(self, config, mask_spec):
    """The step compiled ahead of time for the config's batch, with `compiler_options`."""
    return compile_lowered(self.lower(config, mask_spec), config)

  @property
  def replicated(self):
    return NamedSharding(self.mesh, P())


# XLA:CPU options by `config.xla_cpu_matmul`. An empty list of YNN fusion kinds takes the dots
# away from YNNPACK (XLA's default); oneDNN then claims each dot as its own fusion, else Eigen
# runs them.
_CPU_MATMUL_OPTIONS = {
  'onednn': {
    'xla_cpu_experimental_ynn_fusion_type': '',
    'xla_cpu_use_onednn': True,
    'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
  },
  'eigen': {'xla_cpu_experimental_ynn_fusion_type': ''},
  'ynnpack': {},
}


def compiler_options(config, backend: str | None = None) -> dict:
  """Per-compile XLA options for the train step on `backend` (default: JAX's default backend).

  On CPU they pick the matmul library (`config.xla_cpu_matmul`). On the ViT-Ti/16 reference
  step, timed interleaved in one process, oneDNN (the default) was 3-6% faster than Eigen and
  6-11% faster than YNNPACK, XLA's own default; since Dense multiplies flat views
  (`layers.flat_dot_general`) the three are within 1-3% (bench/README.md). Elsewhere: {}.
  """
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    return {}
  return dict(_CPU_MATMUL_OPTIONS[config.xla_cpu_matmul])


def compile_lowered(lowered, config):
  """`lowered.compile(compiler_options(config))`; a jaxlib that no longer knows the option
  compiles with XLA's defaults instead (logged), rather than failing the run."""
  options = compiler_options(config)
  if not options:
    return lowered.compile()
  try:
    return lowered.compile(options)
  except Exception as e:  # XlaRuntimeError, whose import path moves between jax versions.
    if not any(k in str(e) for k in options):
      raise
    logging.warning('XLA rejected %s (%s); compiling with its defaults.', options, e)
    return lowered.compile()


def make_sharded_step(config, mesh, steps_per_epoch: int) -> ShardedStep:
  """Builds the models, the state's shardings (from the params' logical names) and the step.

  The state is never materialised whole on one device: its shapes come from `eval_shape`, and
  `create` initialises every leaf directly into its shard.
  """
  encoder, predictor = models.build_encoder(config), models.build_predictor(config)
  tx = step_lib.make_optimizer(config)
  schedules = Schedules.from_config(config, steps_per_epoch)
  boxed = jax.eval_shape(
    lambda r: step_lib.create_train_state(encoder, predictor, tx, config, r, boxed=True),
    jax.random.key(0),
  )
  state_sh = sharding.tree_shardings(boxed, mesh)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), state_sh
  )
  create = jax.jit(
    lambda r: step_lib.create_train_state(encoder, predictor, tx, config, r), out_shardings=state_sh
  )
  inner = step_lib.make_train_step(config, encoder, predictor, tx, schedules)

  def step(state, batch, rng):
    with sharding.activation_sharding(mesh):  # Active while jit traces the step.
      return inner(state, batch, rng)

  replicated = NamedSharding(mesh, P())
  batch_sh = batch_lib.batch_shardings(mesh)
  jitted = jax.jit(
    step,
    donate_argnums=(0,),
    in_shardings=(state_sh, batch_sh, replicated),
    out_shardings=(state_sh, replicated),
  )
  return ShardedStep(mesh, encoder, predictor, tx, abstract, state_sh, batch_sh, create, jitted)


def describe_memory(setup: ShardedStep, compiled=None) -> dict:
  """Parameter counts and per-device bytes of the state (and XLA's analysis of the step)."""
  s = setup.abstract_state
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  per_dev = lambda t, sh: sharding.bytes_per_device(t, sh)  # noqa: E731
  info = {
    'mesh': dict(setup.mesh.shape),
    'encoder_params': count(s.params['encoder']),
    'predictor_params': count(s.params['predictor']),
    'bytes_per_device': {
      'params': per_dev(s.params, setup.state_shardings.params),
      'opt_state': per_dev(s.opt_state, setup.state_shardings.opt_state),
      'ema_target': per_dev(s.target_params, setup.state_shardings.target_params),
    },
  }
  if compiled is not None:
    mem = compiled.memory_analysis()
    if mem is not None:
      info['compiled'] = {
        k: int(getattr(mem, k))
        for k in (
          'argument_size_in_bytes',
          'output_size_in_bytes',
          'alias_size_in_bytes',
          'temp_size_in_bytes',
          'generated_code_size_in_bytes',
        )
        if hasattr(mem, k)
      }
      c = info['compiled']
      # Donated arguments alias their outputs: live bytes = args + outputs - aliased + temps.
      c['peak_estimate_bytes'] = (
        c.get('argument_size_in_bytes', 0)
        + c.get('output_size_in_bytes', 0)
        - c.get('alias_size_in_bytes', 0)
        + c.get('temp_size_in_bytes', 0)
      )
  return info


def log_memory(info: dict):
  gib = 2.0**30
  b = info['bytes_per_device']
  logging.info(
    'mesh %s; encoder %.2fM params, predictor %.2fM params; per device: params %.3f GiB, '
    'optimiser %.3f GiB, EMA target %.3f GiB',
    info['mesh'],
    info['encoder_params'] / 1e6,
    info['predictor_params'] / 1e6,
    b['params'] / gib,
    b['opt_state'] / gib,
    b['ema_target'] / gib,
  )
  if 'compiled' in info:
    c = info['compiled']
    logging.info(
      'compiled step per device: arguments %.3f GiB, temporaries %.3f GiB, peak ~%.3f GiB',
      c.get('argument_size_in_bytes', 0) / gib,
      c.get('temp_size_in_bytes', 0) / gib,
      c['peak_estimate_bytes'] / gib,
    )


def save_config(config, plan: RunPlan, workdir: str):
  """The resolved config and plan next to the run, for humans and for resuming."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, 'plan.json'), 'w') as f:
    json.dump(
      {**dataclasses.asdict(plan), 'mask_spec': dataclasses.asdict(plan.mask_spec)}, f, indent=2
    )


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
    random_params = nn.unbox(encoder.init(init_rng, jnp.zeros((1, size, size, 3)))['params'])
    candidates.append(('random_init', random_params))
  for name, params in candidates:
    res = logreg.linear_probe(
      features.encoder_features(encoder, params, train_x),
      train_y,
      features.encoder_features(encoder, params, test_x),
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


# Keys that may change when a run is resumed: they steer the job, not the result.
RESUMABLE_CHANGES = (
  'total_steps',
  'log_every_steps',
  'checkpoint.',
  'eval.',
  'mesh.',
  'data.data_dir',
  'model.remat',
  'xla_cpu_matmul',
  'on_nonfinite',
  'max_consecutive_skips',
)


class NonFiniteError(FloatingPointError):
  """The loss or the gradients were not finite; the message names the step and checkpoint."""


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(old: dict, new: dict) -> list[str]:
  """Keys whose values differ between two config dicts (as JSON), minus RESUMABLE_CHANGES."""
  a, b = _flatten(old), _flatten(new)
  norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (JSON has no tuples)
  return [
    f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
    for k in sorted(a.keys() | b.keys())
    if norm(a.get(k)) != norm(b.get(k)) and not k.startswith(RESUMABLE_CHANGES)
  ]


def check_workdir_config(config, workdir: str):
  """Refuses to resume a workdir that holds another config, unless explicitly allowed."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  changes = config_changes(old, json.loads(config.to_json_best_effort()))
  if not changes:
    return
  listing = '\n  '.join(changes)
  if config.checkpoint.allow_config_change:
    logging.warning('resuming %s with a changed config:\n  %s', workdir, listing)
    return
  raise config_lib.ConfigError(
    f'{workdir} holds a run with another config:\n  {listing}\n'
    'Use a new --workdir, or pass --config.checkpoint.allow_config_change=True to resume anyway.'
  )


def replicate(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  """The same host value on every device of a (possibly multi-host) mesh."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = replicate(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains with I-JEPA + StoP, then probes the target encoder. Returns a summary dict.

  Rerunning with the same workdir resumes from the latest good checkpoint. After a SIGTERM
  the run saves, returns {'preempted': True, ...} and skips the probe.
  """
  config_lib.validate(config, num_devices=jax.device_count())
  check_workdir_config(config, workdir)
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

  mesh = sharding.make_mesh(config)
  setup = make_sharded_step(config, mesh, plan.steps_per_epoch)
  encoder = setup.encoder
  init_rng, step_rng, probe_rng = jax.random.split(jax.random.key(config.seed), 3)
  batch_sh = setup.batch_shardings
  step_rng = replicate(step_rng, setup.replicated)

  ckpt = checkpointing.Checkpointer(workdir, config)
  restored = ckpt.restore_latest(setup.abstract_state)
  skipped = 0
  if restored is None:
    state = setup.create(replicate(init_rng, setup.replicated))
  else:
    state, meta = restored
    skipped = int(meta.get('nonfinite_skipped', 0))
  start_step = int(state.step)
  t_compile = time.perf_counter()
  # Compiled ahead of time from shapes: a batch of another shape fails loudly instead of
  # silently recompiling, and XLA's memory analysis is known before the first step.
  step_fn = setup.compile(config, plan.mask_spec)
  logging.info(
    'compiled the train step in %.1fs; starting at step %d',
    time.perf_counter() - t_compile,
    start_step,
  )
  log_memory(describe_memory(setup, step_fn))

  def meta(step: int) -> dict:
    # The data position is the step (the pipeline is a function of it); stored to be explicit.
    return {
      'step': step,
      'examples_seen': step * config.data.global_batch_size,
      'data': {k: config.data[k] for k in ('source', 'name', 'train_split', 'global_batch_size')},
      'seed': config.seed,
      'step_key': np.asarray(jax.random.key_data(step_rng)).tolist(),
      'nonfinite_skipped': skipped,
    }

  # Batches become global arrays on the devices two steps ahead, in a background thread.
  batches = input_pipeline.prefetch_to_device(
    input_pipeline.create_train_iterator(config, plan.mask_spec, start_step=start_step),
    batch_sh,
    size=2,
  )
  logger = MetricLogger(workdir, plan.total_steps, config.data.global_batch_size, write=is_main)
  watcher = checkpointing.PreemptionWatcher()
  t0 = time.perf_counter()
  pending_check = None  # (step, metrics) whose finiteness is checked one step late
  consecutive = 0
  preempted_at = None

  def check_finite(step, metrics):
    nonlocal skipped, consecutive
    if not int(metrics['nonfinite']):
      consecutive = 0
      return
    skipped += 1
    consecutive += 1
    last = ckpt.last_saved_step
    if last:
      where = f'the last good checkpoint is step {last} in {ckpt.directory}'
    else:
      where = 'no checkpoint was saved yet'
    if config.on_nonfinite == 'stop' or consecutive >= config.max_consecutive_skips:
      ckpt.wait()
      reason = (
        'config.on_nonfinite=stop'
        if config.on_nonfinite == 'stop'
        else f'{consecutive} consecutive skipped steps (config.max_consecutive_skips)'
      )
      raise NonFiniteError(
        f'non-finite loss or gradients at step {step} (loss {float(metrics["loss"])}, grad norm '
        f'{float(metrics["grad_norm"])}); stopped by {reason}. The update was not applied; '
        f'{where}.'
      )
    logging.warning(
      'non-finite loss or gradients at step %d: update skipped (%d so far)', step, skipped
    )

  try:
    for step in range(start_step, plan.total_steps):
      batch = next(batches)
      state, metrics = step_fn(state, batch, step_rng)
      done = step + 1
      if step == start_step:
        jax.block_until_ready(metrics)
        logging.info('first step took %.1fs', time.perf_counter() - t0)
        logger.start(done)
      if pending_check is not None:
        check_finite(*pending_check)  # waits only for the previous step
      pending_check = (done, metrics)
      logger.flush_pending()  # the previous logging step's metrics, fetched one step late
      if done % config.log_every_steps == 0 or done == plan.total_steps:
        logger.push(done, metrics)
      final = done == plan.total_steps
      if watcher.reached(done):
        preempted_at = done
      if config.eval.knn_every_steps and done % config.eval.knn_every_steps == 0:
        res = knn.knn_eval(config, encoder, state.target_params)  # a cheap periodic sanity metric
        logger.write_summary(done, res, prefix='knn')
      if final or preempted_at is not None or ckpt.due(done):
        check_finite(*pending_check)  # never save past an unnoticed non-finite step
        pending_check = None
        ckpt.save(done, state, meta(done))
      if preempted_at is not None:
        break
    if pending_check is not None:
      check_finite(*pending_check)
    last_metrics = logger.flush_pending()
    ckpt.wait()
  except BaseException:
    # Leave no orbax threads or open event files behind in a notebook or test process.
    ckpt.close()
    logger.close()
    raise
  finally:
    watcher.close()
    batches.close()

  if preempted_at is not None:
    logging.warning(
      'preempted: saved step %d in %s; rerun the same command to resume',
      preempted_at,
      ckpt.directory,
    )
    logger.close()
    ckpt.close()
    return {'steps': preempted_at, 'preempted': True, 'final_metrics': last_metrics}

  summary = {'steps': plan.total_steps, 'final_metrics': last_metrics, 'nonfinite_skipped': skipped}
  if config.eval.probe:
    summary['probe'] = run_probe(config, encoder, state.target_params, probe_rng)
    for name, res in summary['probe'].items():
      logger.write_summary(plan.total_steps, res, prefix=f'probe_{name}')
  logger.close()
  ckpt.close()
  if is_main:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=float)
  return summary
