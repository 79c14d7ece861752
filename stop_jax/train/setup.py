"""The sharded train step: models, state shardings (from the params' logical names), the jit.

`make_sharded_step` is what the loop, the compile check and the benches build; `describe_memory`
reports what the state and the compiled step take per device.
"""

from __future__ import annotations

import dataclasses
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

from stop_jax import models
from stop_jax.data import batch as batch_lib
from stop_jax.data import masking
from stop_jax.runtime import compiler, sharding
from stop_jax.train import step as step_lib
from stop_jax.train.schedules import Schedules


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
  # jitted (state, batch, rng, limits) -> (state, metrics); state donated. limits: the
  # divergence guard's bounds (`step.step_limits()` bounds nothing).
  step: Callable

  def lower(self, config: ml_collections.ConfigDict, mask_spec: masking.MaskSpec):
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
    batch = batch_lib.abstract_batch(config, mask_spec, self.batch_shardings)
    limits = {
      k: jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
      for k in step_lib.LIMIT_KEYS
    }
    return self.step.lower(self.abstract_state, batch, rng, limits)

  def compile(self, config: ml_collections.ConfigDict, mask_spec: masking.MaskSpec):
    """The step compiled ahead of time for the config's batch, with `compiler.compiler_options`."""
    return compiler.compile_lowered(self.lower(config, mask_spec), config.xla_cpu_matmul)

  @property
  def replicated(self):
    return NamedSharding(self.mesh, P())


def make_sharded_step(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, schedules: Schedules
) -> ShardedStep:
  """Builds the models, the state's shardings (from the params' logical names) and the step.

  The state is never materialised whole on one device: its shapes come from `eval_shape`, and
  `create` initialises every leaf directly into its shard.
  """
  encoder, predictor = models.build_encoder(config), models.build_predictor(config)
  tx = step_lib.make_optimizer(config)
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

  def step(state, batch, rng, limits):
    with sharding.activation_sharding(mesh):  # Active while jit traces the step.
      return inner(state, batch, rng, limits)

  replicated = NamedSharding(mesh, P())
  batch_sh = batch_lib.batch_shardings(mesh)
  jitted = jax.jit(
    step,
    donate_argnums=(0,),
    in_shardings=(state_sh, batch_sh, replicated, replicated),
    out_shardings=(state_sh, replicated),
  )
  return ShardedStep(mesh, encoder, predictor, tx, abstract, state_sh, batch_sh, create, jitted)


def describe_memory(sharded: ShardedStep, compiled=None) -> dict:
  """Parameter counts and per-device bytes of the state (and XLA's analysis of the step)."""
  s = sharded.abstract_state
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  per_dev = lambda t, sh: sharding.bytes_per_device(t, sh)  # noqa: E731
  info = {
    'mesh': dict(sharded.mesh.shape),
    'encoder_params': count(s.params['encoder']),
    'predictor_params': count(s.params['predictor']),
    'bytes_per_device': {
      'params': per_dev(s.params, sharded.state_shardings.params),
      'opt_state': per_dev(s.opt_state, sharded.state_shardings.opt_state),
      'ema_target': per_dev(s.target_params, sharded.state_shardings.target_params),
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
  """Logs `describe_memory`'s counts and per-device GiB."""
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


def replicate(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  """The same host value on every device of a (possibly multi-host) mesh."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = replicate(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))
