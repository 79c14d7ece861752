"""The step guard on its own: a fake checkpointer and hand-made step metrics.

The guard's limits inside the real step, and the huge-LR runs end to end, are at the bottom.
"""

import json
import logging
import os
import re
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.runtime import checkpointing, compiler
from stop_jax.train import guard as guard_lib
from stop_jax.train import loop, setup
from stop_jax.train import step as step_lib
from stop_jax.train.guard import DivergenceError, DivergenceRule, NonFiniteError, StepGuard
from stop_jax.train.schedules import Schedules

INF = np.float32(np.inf)


class FakeCheckpointer:
  def __init__(self, *saved):
    self.saved = list(saved)
    self.directory = '/runs/x/checkpoints'
    self.waits = 0
    self.manager = types.SimpleNamespace(all_steps=lambda: list(self.saved))

  def wait(self):
    self.waits += 1


def _config(on_nonfinite='stop', max_skips=5, **divergence):
  c = config_lib.base_config()
  c.on_nonfinite, c.max_consecutive_skips = on_nonfinite, max_skips
  c.divergence.update(divergence)
  return c


def _guard(*saved, **kwargs):
  return StepGuard(_config(**kwargs), FakeCheckpointer(*saved))


def _metrics(loss=0.5, update_norm=1.0, param_norm=100.0, finite=True, diverged=False) -> dict:
  """What the step returns for the guard (host scalars, as fetched)."""
  loss = loss if finite else np.nan
  return {
    'nonfinite': np.int32(not finite),
    'diverged': np.int32(diverged),
    'loss': np.float32(loss),
    'total_loss': np.float32(loss),
    'grad_norm': np.float32(1.0),
    'update_norm': np.float32(update_norm),
    'param_norm': np.float32(param_norm),
  }


def _step_verdict(guard, step, loss, update_norm=1.0, param_norm=100.0):
  """The step's own decision (`step.apply_update`) under the limits the guard gives it."""
  lim = guard.host_limits(step)
  loss, update_norm = np.float32(loss), np.float32(update_norm)
  within = (
    loss <= lim['loss']
    and update_norm <= lim['update_norm']
    and update_norm <= lim['update_ratio'] * np.float32(param_norm)
  )
  return _metrics(loss, update_norm, param_norm, finite=np.isfinite(loss), diverged=not within)


# --- the rule ---------------------------------------------------------------------------------


def test_running_median():
  assert guard_lib.running_median([3.0, 1.0, 2.0]) == 2.0
  assert guard_lib.running_median([4.0, 1.0, 3.0, 2.0]) == 2.5  # the mean of the middle two
  with pytest.raises(ValueError):
    guard_lib.running_median([])


def test_rule_limits_warmup_factors_and_bounds():
  rule = DivergenceRule(loss_spike_factor=10, update_spike_factor=4, warmup_steps=3)
  losses, norms = [1.0, 3.0, 2.0], [0.5, 0.5, 2.0]
  # Warmup: fewer than 3 steps passed -> no spike limits yet.
  assert rule.limits(losses, norms, passed=2) == {
    'loss': INF,
    'update_norm': INF,
    'update_ratio': INF,
  }
  lim = rule.limits(losses, norms, passed=3)
  assert lim['loss'] == np.float32(20.0) and lim['update_norm'] == np.float32(2.0)
  assert lim['update_ratio'] == INF
  assert all(isinstance(v, np.float32) for v in lim.values())  # what the step compares in
  # The absolute bound caps the spike limit; the ratio bound needs no history at all.
  rule = DivergenceRule(update_spike_factor=4, max_update_norm=1.5, max_update_ratio=0.5)
  assert rule.limits(losses, norms, passed=50)['update_norm'] == np.float32(1.5)
  assert rule.limits([], [], passed=0) == {
    'loss': INF,
    'update_norm': np.float32(1.5),
    'update_ratio': np.float32(0.5),
  }
  assert DivergenceRule().limits(losses, norms, 50) == {
    'loss': INF,
    'update_norm': INF,
    'update_ratio': INF,
  }  # every rule off


def test_defaults_are_on_and_loose():
  rule = DivergenceRule.from_config(config_lib.base_config())
  assert rule.action == 'stop' and rule.loss_spike_factor >= 10 and rule.update_spike_factor == 0
  assert rule.max_update_ratio == 1.0 and rule.max_update_norm == 0.0
  assert rule.window >= 100 and rule.warmup_steps >= 10


@pytest.mark.parametrize(
  'key, value',
  [('action', 'halt'), ('loss_spike_factor', 0.5), ('max_update_ratio', -1.0), ('window', 0)],
)
def test_bad_divergence_values_are_refused(key, value):
  c = _config(**{key: value})
  with pytest.raises(config_lib.ConfigError, match=f'config.divergence.{key}='):
    config_lib.validate(c)


# --- the running median over the steps that passed ------------------------------------------


def test_limits_come_from_the_window_of_steps_up_to_two_before():
  guard = _guard(loss_spike_factor=10, update_spike_factor=0, window=3, warmup_steps=2)
  losses = {1: 1.0, 2: 5.0, 3: 2.0, 4: 4.0, 5: 3.0}
  assert guard.host_limits(1)['loss'] == INF
  for step, loss in losses.items():
    guard.push(step, _metrics(loss))
  guard.flush()
  assert guard.host_limits(3)['loss'] == INF  # only step 1 before it: warmup
  assert guard.host_limits(4)['loss'] == np.float32(30.0)  # median(1, 5) = 3
  assert guard.host_limits(6)['loss'] == np.float32(40.0)  # median(5, 2, 4): steps 2-4
  assert guard.host_limits(7)['loss'] == np.float32(30.0)  # median(2, 4, 3): steps 3-5


def test_loss_spike_skip_drops_it_from_the_median_and_counts_it(caplog):
  guard = _guard(on_nonfinite='skip', max_skips=3, action='skip', warmup_steps=2, window=10)
  for step in range(1, 5):
    guard.check(step, _step_verdict(guard, step, 1.0))
  spike = _step_verdict(guard, 5, 11.0)  # above 10 x the median 1
  assert int(spike['diverged']) == 1
  with caplog.at_level(logging.WARNING):
    guard.check(5, spike)
  assert 'divergence at step 5: loss 11 above 10 x the running median of the last 3 steps' in (
    caplog.text
  )
  assert 'update skipped (1 so far)' in caplog.text
  assert guard.divergence_skipped == 1 and guard.nonfinite_skipped == 0
  guard.check(6, _step_verdict(guard, 6, 2.0))  # passes: resets the consecutive count
  # The spike never entered the median: steps 1-4 and 6 only.
  assert guard.host_limits(8)['loss'] == np.float32(10 * 1.0)
  # Non-finite and divergent steps count together against max_consecutive_skips.
  guard.check(7, _metrics(finite=False))
  guard.check(8, _step_verdict(guard, 8, 50.0))
  with pytest.raises(DivergenceError, match='3 consecutive skipped steps') as info:
    guard.check(9, _step_verdict(guard, 9, 50.0))
  assert guard.divergence_skipped == 3 and guard.nonfinite_skipped == 1
  assert '--config.divergence.action=skip' not in str(info.value)  # already skipping


def test_update_rules_name_themselves():
  guard = _guard(max_update_norm=5.0, max_update_ratio=0.1, warmup_steps=1)
  with pytest.raises(DivergenceError) as info:
    guard.check(1, _step_verdict(guard, 1, 0.5, update_norm=20.0, param_norm=100.0))
  message = str(info.value)
  assert message.startswith('divergence at step 1: update norm 20 above ')
  assert 'config.divergence.max_update_norm=5' in message
  assert "above 0.1 x the params' norm 100 (config.divergence.max_update_ratio)" in message
  assert 'stopped by config.divergence.action=stop. The update was not applied;' in message
  assert message.endswith('no checkpoint was saved yet.')


def test_update_spike_against_its_median():
  guard = _guard(update_spike_factor=10, loss_spike_factor=0, warmup_steps=2, max_update_ratio=0)
  for step in (1, 2, 3):
    guard.check(step, _step_verdict(guard, step, 0.5, update_norm=2.0))
  assert int(_step_verdict(guard, 4, 0.5, update_norm=19.0)['diverged']) == 0
  with pytest.raises(DivergenceError, match=r'update norm 21 above 10 x the running median'):
    guard.check(4, _step_verdict(guard, 4, 0.5, update_norm=21.0))


# --- the last good checkpoint ------------------------------------------------------------------


def test_a_loss_spike_withdraws_the_checkpoint_before_it():
  """Saved at 5, 10, 11, 12; every step up to 12 passed, then step 13's loss spikes: the params of
  step 12 produced that loss, so the last good checkpoint is 11, not 12 (the newest saved)."""
  ckpt = FakeCheckpointer(5, 10, 11, 12)
  c = _config(warmup_steps=2)
  guard = StepGuard(c, ckpt)
  for step in range(1, 13):
    guard.check(step, _step_verdict(guard, step, 1.0))
  assert guard.trusted == 12
  with pytest.raises(DivergenceError) as info:
    guard.check(13, _step_verdict(guard, 13, 100.0))
  message = str(info.value)
  assert guard.trusted == 11
  assert message.startswith('divergence at step 13: loss 100 above 10 x the running median')
  assert (
    'the last good checkpoint is step 11 in /runs/x/checkpoints (every step up to it passed the '
    'guard). To resume from it, move the later ones aside (mkdir -p /runs/x/diverged && mv '
    '/runs/x/checkpoints/12 /runs/x/diverged/), then rerun with a change '
    '(--config.divergence.action=skip, or a lower --config.optim.lr with '
    '--config.checkpoint.allow_config_change=True).'
  ) in message
  assert ckpt.waits == 1  # pending saves finish before the run stops


def test_dropped_updates_keep_the_state_trusted_and_skip_streaks_do_not():
  # An update-norm step (or a non-finite one) is dropped: the state stays the trusted one.
  kwargs = dict(action='skip', on_nonfinite='skip', max_skips=10, warmup_steps=1)
  guard = _guard(3, 4, max_update_ratio=0.5, **kwargs)
  guard.check(1, _step_verdict(guard, 1, 1.0))
  guard.check(2, _step_verdict(guard, 2, 1.0, update_norm=80.0))
  guard.check(3, _metrics(finite=False))
  assert guard.trusted == 3
  # A streak of loss spikes: the state they all come from (step 3's) is not vouched for.
  for step in (4, 5, 6):
    guard.check(step, _step_verdict(guard, step, 100.0))
  assert guard.trusted == 2
  message = guard_lib.resume_advice('gs://b/run/checkpoints', [3, 4, 6], guard.trusted)
  assert message.startswith(
    'no checkpoint passed the guard (those in gs://b/run/checkpoints hold the diverging params)'
  )
  advice = guard_lib.resume_advice('gs://b/run/checkpoints', [2, 4, 6], guard.trusted)
  assert (
    'move the later ones aside (gcloud storage mv gs://b/run/checkpoints/4 gs://b/run/diverged/4 '
    '&& gcloud storage mv gs://b/run/checkpoints/6 gs://b/run/diverged/6)'
  ) in advice


def test_nonfinite_stop_names_the_step_and_the_last_good_checkpoint():
  ckpt = FakeCheckpointer(3)
  guard = StepGuard(_config(), ckpt)
  guard.check(4, _metrics())
  with pytest.raises(NonFiniteError) as info:
    guard.check(5, _metrics(finite=False))
  message = str(info.value)
  assert message.startswith('non-finite loss or gradients at step 5 (loss nan, grad norm 1.0)')
  assert 'stopped by config.on_nonfinite=stop. The update was not applied;' in message
  assert 'the last good checkpoint is step 3 in /runs/x/checkpoints' in message
  assert message.endswith(
    'rerun with a change (--config.on_nonfinite=skip, or a lower '
    '--config.optim.lr with --config.checkpoint.allow_config_change=True).'
  )
  assert ckpt.waits == 1


def test_nonfinite_skip_counts_and_stops_after_max_consecutive_skips(caplog):
  meta = {'nonfinite_skipped': 3}  # 3 from before a resume (an older checkpoint's meta)
  guard = StepGuard(_config('skip', 2), FakeCheckpointer(2), start_step=2, meta=meta)
  with caplog.at_level(logging.WARNING):
    guard.check(3, _metrics(finite=False))
  assert guard.nonfinite_skipped == 4
  assert (
    'non-finite loss or gradients at step 3 (loss nan, grad norm 1.0): update skipped (4 so far)'
    in caplog.text
  )
  guard.check(4, _metrics())  # a finite step resets the consecutive count
  guard.check(5, _metrics(finite=False))
  with pytest.raises(NonFiniteError, match='2 consecutive skipped steps') as info:
    guard.check(6, _metrics(finite=False))
  assert 'at step 6' in str(info.value) and '(config.max_consecutive_skips)' in str(info.value)
  assert guard.nonfinite_skipped == 6


def test_push_checks_one_step_late_and_flush_checks_the_rest():
  guard = _guard(max_skips=1)
  guard.push(1, _metrics(finite=False))  # not read yet: the step may still be running
  with pytest.raises(NonFiniteError, match='at step 1 '):
    guard.push(2, _metrics())
  guard = _guard(max_skips=1)
  guard.push(1, _metrics())
  guard.push(2, _metrics(finite=False))
  with pytest.raises(NonFiniteError, match='at step 2 '):
    guard.flush()
  guard.flush()  # nothing pending any more


# --- resuming ------------------------------------------------------------------------------------


def _losses(n: int) -> dict:
  """A loss curve with noise, two isolated spikes (9, 23) and a streak of three (30-32)."""
  rng = np.random.default_rng(0)
  out = {s: float(np.float32(1.0 / (1 + 0.05 * s) * rng.uniform(0.8, 1.25))) for s in range(1, n)}
  for s in (9, 23, 30, 31, 32):
    out[s] *= 40.0
  return out


def _drive(guard, steps, losses, saves, log):
  """Runs the loop's side of the guard over `steps`: limits, verdict, push, flush and meta before
  each save (as `loop._Run.steps`). Returns the metas saved, by step."""
  metas = {}
  for step in steps:
    log.append((step, dict(guard.host_limits(step))))
    guard.push(step, _step_verdict(guard, step, losses[step], update_norm=losses[step] / 10))
    if step in saves:
      guard.flush()
      metas[step] = json.loads(json.dumps(guard.meta()))  # as the checkpoint's JSON stores it
  guard.flush()
  return metas


def test_a_resumed_guard_decides_exactly_like_an_uninterrupted_one():
  kwargs = dict(action='skip', on_nonfinite='skip', max_skips=5, warmup_steps=4, window=6)
  losses = _losses(40)
  whole, log_whole = _guard(**kwargs), []
  metas = _drive(whole, range(1, 40), losses, {10, 20, 29, 31}, log_whole)
  assert whole.divergence_skipped == 5  # the spikes, and nothing else
  for resume_at in (20, 29, 31):  # a clean step, the step before a streak, inside the streak
    resumed = StepGuard(_config(**kwargs), FakeCheckpointer(), resume_at, metas[resume_at])
    log = []
    _drive(resumed, range(resume_at + 1, 40), losses, set(), log)
    assert log == log_whole[resume_at:]  # the same limits for every step
    assert resumed.meta() == whole.meta()
  # Without the stored history the first steps after a resume would get no limits at all.
  fresh = StepGuard(_config(**kwargs), FakeCheckpointer(), 20, {})
  assert fresh.host_limits(21)['loss'] == INF != log_whole[20][1]['loss']


# --- inside the step ---------------------------------------------------------------------------


def _tiny_step_setup():
  c = config_lib.base_config()
  c.model.image_size, c.model.patch_size = 16, 4
  c.model.width, c.model.depth, c.model.num_heads = 32, 1, 4
  c.predictor.width, c.predictor.depth, c.predictor.num_heads = 16, 1, 2
  c.mask.num_targets = 2
  enc, pred = models.build_encoder(c), models.build_predictor(c)
  tx = step_lib.make_optimizer(c)
  sched = Schedules.from_config(c, steps_per_epoch=10)
  state = jax.jit(lambda k: step_lib.create_train_state(enc, pred, tx, c, k))(jax.random.key(0))
  rng = np.random.default_rng(0)
  perm = np.stack([rng.permutation(16) for _ in range(4)])
  batch = {
    'image': rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
    'ctx_idx': np.sort(perm[:, :6], 1).astype(np.int32),
    'ctx_valid': np.ones((4, 6), bool),
    'tgt_idx': np.stack([np.sort(perm[:, 6 + 3 * i : 9 + 3 * i], 1) for i in range(2)]),
    'tgt_valid': np.ones((2, 4, 3), bool),
  }
  return step_lib.make_train_step(c, enc, pred, tx, sched), state, batch


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree)))


@pytest.mark.slow
def test_the_step_drops_an_update_over_its_limits():
  train_step, state, batch = _tiny_step_setup()
  before = jax.tree.map(np.asarray, state)
  key = jax.random.key(1)
  step = jax.jit(train_step)  # no donation: the same state feeds every call
  free, m = step(state, batch, key, step_lib.step_limits())
  assert int(m['diverged']) == 0 and int(m['nonfinite']) == 0
  moved = jax.tree.map(lambda a, b: np.asarray(a) - b, free.params, before.params)
  np.testing.assert_allclose(float(m['update_norm']), _norm(jax.tree.leaves(moved)), rtol=1e-4)
  np.testing.assert_allclose(
    float(m['param_norm']), _norm(jax.tree.leaves(before.params)), rtol=1e-5
  )
  loss, un, pn = float(m['total_loss']), float(m['update_norm']), float(m['param_norm'])
  for limits in (
    step_lib.step_limits(loss=0.99 * loss),
    step_lib.step_limits(update_norm=0.99 * un),
    step_lib.step_limits(update_ratio=0.99 * un / pn),
  ):
    new, m2 = step(state, batch, key, limits)
    assert int(m2['diverged']) == 1 and int(m2['nonfinite']) == 0
    assert int(new.step) == 1  # the step count advances; nothing else moved
    kept = (new.params, new.target_params, new.opt_state.inner_state)
    old = (before.params, before.target_params, before.opt_state.inner_state)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(old), strict=True):
      np.testing.assert_array_equal(a, b)
  # At the limit exactly the update goes through (the bounds are inclusive).
  _, m3 = step(state, batch, key, step_lib.step_limits(loss=loss, update_norm=un))
  assert int(m3['diverged']) == 0


# --- the huge-LR blow-up, end to end ------------------------------------------------------------


@pytest.fixture(scope='module')
def compile_each_step_once():
  """The runs below compile a handful of distinct step programs: each once (keyed by its HLO)."""
  programs = {}

  def compile_once(sharded, config, mask_spec):
    lowered = sharded.lower(config, mask_spec)
    key = (lowered.as_text(), config.xla_cpu_matmul)
    if key not in programs:
      programs[key] = compiler.compile_lowered(lowered, config.xla_cpu_matmul)
    return programs[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(setup.ShardedStep, 'compile', compile_once)
    yield


def _run_config(steps: int, **checkpoint):
  c = config_lib.load_config_file('tiny.py', f'steps={steps}')
  c.model.depth, c.predictor.depth = 2, 1  # keep CI fast; the step code is the same
  c.data.global_batch_size = 32
  c.log_every_steps = 1
  c.eval.probe = False
  c.checkpoint.every_minutes = 0.0
  c.checkpoint.update(checkpoint)
  return c


def _saved(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _param_norm(workdir, step) -> float:
  return _norm(jax.tree.leaves(checkpointing.load_checkpoint(str(workdir), step)[1]['params']))


@pytest.mark.slow
def test_huge_lr_is_stopped_at_its_first_update(tmp_path, compile_each_step_once):
  """The issue's run (`--config.optim.lr=1e3 --config.on_nonfinite=skip`, saving every 5 steps)
  went on to step 22, its checkpoints 5-20 holding params of 1e30 and more, and called step 20
  the last good checkpoint. The update-size rule stops it at step 1, before any save."""
  config = _run_config(22, every_steps=5)
  config.optim.lr, config.on_nonfinite = 1e3, 'skip'
  with pytest.raises(DivergenceError) as info:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert message.startswith('divergence at step 1: update norm ')
  assert "x the params' norm" in message and '(config.divergence.max_update_ratio)' in message
  assert message.endswith('The update was not applied; no checkpoint was saved yet.')
  assert _saved(tmp_path) == []


@pytest.mark.slow
def test_huge_lr_skip_drops_every_update_and_keeps_the_checkpoints_sound(
  tmp_path, compile_each_step_once
):
  config = _run_config(22, every_steps=5)
  config.optim.lr, config.on_nonfinite, config.divergence.action = 1e3, 'skip', 'skip'
  with pytest.raises(DivergenceError, match='10 consecutive skipped steps') as info:
    loop.train_and_evaluate(config, str(tmp_path))
  # Each update was dropped, so the checkpoint at 5 holds the initial params: sound.
  assert 'divergence at step 10: ' in str(info.value)
  assert f'the last good checkpoint is step 5 in {tmp_path}/checkpoints' in str(info.value)
  assert _saved(tmp_path) == [5]
  rows = [json.loads(x) for x in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  steps = {x['step']: x for x in rows if 'loss' in x}
  assert all(steps[s]['diverged'] == 1 for s in range(1, 10))
  assert steps[1]['update_norm'] > 10 * steps[1]['param_norm']  # max_update_ratio is 1
  assert _param_norm(tmp_path, 5) == pytest.approx(steps[1]['param_norm'], rel=1e-6)


def _lr_jumps_at(step_index: int, lr: float):
  """Schedules.learning_rate, but `lr` from `step_index` on (a blow-up at a chosen step)."""
  real = Schedules.learning_rate

  def learning_rate(self, step):
    return jnp.where(jnp.asarray(step) >= step_index, jnp.float32(lr), real(self, step))

  return learning_rate


@pytest.mark.slow
def test_loss_spike_names_the_checkpoint_the_guard_verified_and_the_resume_command_works(
  tmp_path, compile_each_step_once
):
  """The LR jumps to 1e3 at step 11 and only the loss rule is on: the update of step 11 is finite
  and goes in (checkpoint 11 holds it), the loss of step 12 spikes. The last good checkpoint is
  10, not 11 (the newest saved); the printed command moves 11 aside and the rerun resumes at 10."""
  config = _run_config(12, every_steps=1, keep=20)
  config.divergence.max_update_ratio = config.divergence.update_spike_factor = 0.0
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Schedules, 'learning_rate', _lr_jumps_at(10, 1e3))
    with pytest.raises(DivergenceError) as info:
      loop.train_and_evaluate(config, str(tmp_path))
  message, directory = str(info.value), f'{tmp_path}/checkpoints'
  assert message.startswith('divergence at step 12: loss ')
  assert 'x the running median of the last 10 steps that passed' in message
  assert f'the last good checkpoint is step 10 in {directory}' in message
  assert _saved(tmp_path) == list(range(1, 12))
  assert _param_norm(tmp_path, 11) > 100 * _param_norm(tmp_path, 10)  # 11 holds the blow-up
  command = re.search(r'move the later ones aside \((.*?)\), then rerun', message).group(1)
  assert command == f'mkdir -p {tmp_path}/diverged && mv {directory}/11 {tmp_path}/diverged/'
  subprocess.run(command, shell=True, check=True)
  # The rerun with the LR fixed resumes from step 10, its guard state restored with it.
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 12 and summary['divergence_skipped'] == 0
  assert _saved(tmp_path) == list(range(1, 13))
  assert _param_norm(tmp_path, 12) < 2 * _param_norm(tmp_path, 10)
  rows = [json.loads(x) for x in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  losses = {x['step']: x['total_loss'] for x in rows if 'loss' in x}
  assert sorted(losses) == list(range(1, 13))  # 1-10 from the first run, once each
  # The guard's statistics went through checkpoint 10: steps 1-10 of the first run, then 11-12.
  with open(os.path.join(directory, '12', 'meta', 'metadata')) as f:
    history = json.load(f)['guard']['history']
  assert [(h[0], h[1]) for h in history] == sorted(losses.items())
