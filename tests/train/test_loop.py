"""End to end: the real `train_and_evaluate` on the tiny digits config, then a resume."""

import glob
import json
import os

import pytest

from stop_jax import config as config_lib
from stop_jax.data import train_stream
from stop_jax.train import loop, setup
from stop_jax.train import plan as plan_lib

METRIC_KEYS = {
  'loss',
  'lr',
  'wd',
  'momentum',
  'grad_norm',
  'A_norm',
  'A_bias_norm',
  'noise_to_pos',
  'ctx_tokens',
  'tgt_tokens',
  'images_per_s',
  'eta_s',
}


def _tiny(steps):
  c = config_lib.load_config_file('tiny.py', f'steps={steps}')
  c.model.depth, c.predictor.depth = 2, 1  # keep CI fast; the step code is the same
  c.log_every_steps = 5
  c.checkpoint.every_steps = 20
  c.eval.probe_l2 = (1e-3,)
  c.eval.probe_max_examples = 400
  return c


@pytest.mark.slow
def test_tiny_pretraining_learns_logs_probes_and_resumes(tmp_path):
  workdir = str(tmp_path)
  config = _tiny(40)
  config.eval.knn_every_steps = 20  # the periodic k-NN sanity metric
  config.eval.knn_max_examples = 200
  summary = loop.train_and_evaluate(config, workdir)

  lines = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_lines = [x for x in lines if 'loss' in x]
  knn_lines = [x for x in lines if 'knn/knn_top1' in x]
  assert [x['step'] for x in knn_lines] == [20, 40]
  assert all(0.0 <= x['knn/knn_top1'] <= 1.0 for x in knn_lines)
  assert [x['step'] for x in train_lines] == [5, 10, 15, 20, 25, 30, 35, 40]
  assert METRIC_KEYS <= set(train_lines[-1])
  assert train_lines[-1]['loss'] < 0.9 * train_lines[0]['loss']  # it learns
  assert train_lines[-1]['ctx_tokens'] > 0 and train_lines[-1]['tgt_tokens'] > 0
  assert train_lines[0]['noise_to_pos'] > 0  # StoP noise is on by default
  for name in ('pretrained', 'random_init'):
    assert 0.1 < summary['probe'][name]['accuracy'] <= 1.0
    assert summary['probe'][name]['num_test'] == 360  # the held-out digits split
  assert glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['stop']['mode'] == 'masked' and saved['total_steps'] == 40
  plan = json.load(open(os.path.join(workdir, 'plan.json')))
  assert plan['steps_per_epoch'] == 1437 // 128

  # Same workdir, longer run: resumes at the step-40 checkpoint instead of starting over.
  config = _tiny(50)
  config.eval.knn_every_steps = 20
  config.eval.knn_max_examples = 200
  config.eval.probe = False
  summary = loop.train_and_evaluate(config, workdir)
  rows = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))]
  # Each step once: nothing recomputed from scratch, steps 45 and 50 appended.
  assert [x['step'] for x in rows if 'loss' in x] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
  assert summary['final_metrics']['loss'] < train_lines[0]['loss']


@pytest.mark.slow
def test_no_recompilation_after_the_first_step(tmp_path, monkeypatch):
  import jax

  # Count XLA compilations, and remember how many had happened when each step was dispatched.
  compiles, at_step = [], []
  jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: (
      compiles.append(name) if name.endswith('backend_compile_duration') else None
    )
  )
  real_iterator = train_stream.create_train_iterator

  def counting_iterator(*args, **kwargs):
    for batch in real_iterator(*args, **kwargs):
      at_step.append(len(compiles))  # read while the loop runs (the prefetcher runs ahead)
      yield batch

  monkeypatch.setattr(train_stream, 'create_train_iterator', counting_iterator)
  config = _tiny(12)
  config.eval.probe = False
  config.checkpoint.every_steps = 4  # saves and metric fetches in between must not compile
  config.log_every_steps = 3
  loop.train_and_evaluate(config, str(tmp_path))
  assert len(at_step) >= 12
  # The step is compiled ahead of time, before the loop: no compilation during the 12 steps.
  assert at_step[0] >= 1
  assert len(set(at_step)) == 1 and len(compiles) == at_step[0], at_step


@pytest.mark.slow  # three compiles; tests/runtime/test_compiler.py is the fast check
def test_cpu_matmul_library_option_changes_the_kernels_not_the_step():
  import jax
  import numpy as np

  from stop_jax.data import batch as batch_lib
  from stop_jax.runtime import compiler, sharding
  from stop_jax.train import step as step_lib

  c = _tiny(1)
  c.model.depth = 1
  plan = plan_lib.plan_run(c)
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  sharded = setup.make_sharded_step(c, mesh, plan.schedules)
  batch = next(train_stream.create_train_iterator(c, plan.mask_spec, 0, 0, 1))
  batch = batch_lib.to_global(batch, sharded.batch_shardings)
  rng = jax.device_put(jax.random.key(1), sharded.replicated)
  kernels, metrics = {}, {}
  for library in ('onednn', 'eigen', 'ynnpack'):
    c.xla_cpu_matmul = library
    assert compiler.compiler_options(library, 'gpu') == {}
    compiled = sharded.compile(c, plan.mask_spec)
    hlo = compiled.as_text()
    kernels[library] = {k for k in ('__ynn_fusion', '__onednn_fusion') if k in hlo}
    limits = step_lib.step_limits()  # none
    metrics[library] = compiled(sharded.create(jax.random.key(0)), batch, rng, limits)[1]
  # XLA:CPU's default puts the dots in YNNPACK fusions; 'eigen' leaves them as plain dots.
  assert kernels == {'onednn': {'__onednn_fusion'}, 'eigen': set(), 'ynnpack': {'__ynn_fusion'}}
  # Same step, summed in another order.
  for library in ('eigen', 'ynnpack'):
    for key in ('loss', 'grad_norm'):
      np.testing.assert_allclose(metrics[library][key], metrics['onednn'][key], rtol=1e-4)
