"""Resume in-process: the state and the batch a resumed run steps from, against an uninterrupted run.

The fast counterpart of tests/train/test_fault_tolerance.py (real processes, kill -9, SIGTERM):
one tiny uninterrupted run of K + 1 steps saving at step K, then a fresh `train_and_evaluate`
on a copy of its workdir without the step K + 1 checkpoint. What the loop feeds its compiled
step is recorded, so the checks see the state after the loop's own restore: Adam's moments,
the whole state, the batch (the data position) and the next loss must equal the uninterrupted
run's. The same runs check how the loop calls its evaluators (fakes of eval/evaluators.py's).
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.eval import evaluators
from stop_jax.runtime import checkpointing
from stop_jax.train import loop, setup

K = 2  # the resumed run restores step K and runs step K + 1


def _config():
  c = config_lib.load_config_file('tiny.py', f'steps={K + 1}')
  c.model.depth, c.predictor.depth = 1, 1  # the smallest model: the loop is what is tested
  c.data.global_batch_size = 16
  c.log_every_steps = 1
  c.checkpoint.every_steps = K
  c.checkpoint.every_minutes = 0.0
  c.eval.probe = False
  return c


def _flat(tree) -> dict[str, np.ndarray]:
  return {
    jax.tree_util.keystr(p): np.array(x, copy=True)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


class _Recorder:
  """Wraps the compiled step: keeps a host copy of every (state, batch) it is called with."""

  def __init__(self, compiled):
    self.compiled, self.calls = compiled, []

  def __call__(self, state, batch, rng, *limits):
    # Host copies, taken before the step donates the state.
    self.calls.append((_flat(state), {k: np.array(v, copy=True) for k, v in batch.items()}))
    return self.compiled(state, batch, rng, *limits)

  def __getattr__(self, name):  # memory_analysis() etc.
    return getattr(self.compiled, name)


@dataclasses.dataclass
class _FakeEvaluator:
  """An evaluator (eval/evaluators.py's interface) that records the params it is called with."""

  name: str
  every_steps: int
  groups: tuple[str, ...]
  seen: list = dataclasses.field(default_factory=list)

  def __call__(self, encoder, params):
    self.seen.append(_flat(params))
    return {group: {'calls': len(self.seen), 'group_len': len(group)} for group in self.groups}


def _train(workdir, monkeypatch, compiled=None) -> tuple[_Recorder, dict, list]:
  """train_and_evaluate(_config(), workdir) with its compiled step recorded (and, if given,
  `compiled` used as the step instead of compiling it again) and fake evaluators: a periodic
  one every step, a final one with two groups. Returns (recorder, summary, evaluators)."""
  fakes = [_FakeEvaluator('every', 1, ('',)), _FakeEvaluator('final', 0, ('a', 'bb'))]
  recorders = []
  compile_step = setup.ShardedStep.compile

  def recording_compile(self, config, mask_spec):
    recorders.append(_Recorder(compiled or compile_step(self, config, mask_spec)))
    return recorders[-1]

  with monkeypatch.context() as m:
    m.setattr(setup.ShardedStep, 'compile', recording_compile)
    m.setattr(evaluators, 'for_training', lambda config, rng: fakes)
    summary = loop.train_and_evaluate(_config(), str(workdir))
  (recorder,) = recorders
  return recorder, summary, fakes


@dataclasses.dataclass
class _Run:
  calls: list  # [(state, batch)] the compiled step was called with, as host arrays
  summary: dict
  evaluators: list
  workdir: str


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> tuple[_Run, _Run]:
  """The uninterrupted run, and the run resumed from its step K checkpoint."""
  with pytest.MonkeyPatch.context() as monkeypatch:
    full = tmp_path_factory.mktemp('uninterrupted')
    recorder, summary, fakes = _train(full, monkeypatch)
    # The same run interrupted after saving step K: its workdir without the later checkpoint.
    resumed = tmp_path_factory.mktemp('resumed') / 'run'
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / 'checkpoints' / str(K + 1))
    # The same program as the first run's: its executable is reused (compiling is the slow part
    # of this test, and not what it checks).
    resumed_recorder, resumed_summary, resumed_fakes = _train(
      resumed, monkeypatch, recorder.compiled
    )
  return (
    _Run(recorder.calls, summary, fakes, str(full)),
    _Run(resumed_recorder.calls, resumed_summary, resumed_fakes, str(resumed)),
  )


def _moments(state: dict) -> list[str]:
  return [k for k in state if '.mu' in k or '.nu' in k]  # Adam's first and second moments


def test_the_uninterrupted_run_saved_step_k_and_moved(runs):
  full, _ = runs
  assert len(full.calls) == K + 1 and full.summary['steps'] == K + 1
  states = [state for state, _ in full.calls]
  assert [int(s['.step']) for s in states] == list(range(K + 1))
  assert _moments(states[K]) and all(np.any(states[K][k] != 0) for k in _moments(states[K]))


def test_resume_restores_the_optimiser_moments_and_the_whole_state(runs):
  full, resumed = runs
  assert len(resumed.calls) == 1  # only step K + 1 ran again
  expected, restored = full.calls[K][0], resumed.calls[0][0]
  assert restored.keys() == expected.keys()
  assert len(_moments(expected)) >= 2
  for key in _moments(expected):  # first, so that a dropped optimiser state is named as such
    np.testing.assert_array_equal(restored[key], expected[key], err_msg=f'Adam moment {key}')
  for key in expected:  # step, params, EMA target, the rest of the optimiser state
    np.testing.assert_array_equal(restored[key], expected[key], err_msg=key)


def test_resume_continues_the_data_at_step_k(runs):
  full, resumed = runs
  batches = [batch for _, batch in full.calls]
  assert not np.array_equal(batches[K]['image'], batches[0]['image'])  # the check can fail
  resumed_batch = resumed.calls[0][1]
  assert resumed_batch.keys() == batches[K].keys()
  for key in batches[K]:  # images and masks
    np.testing.assert_array_equal(resumed_batch[key], batches[K][key], err_msg=key)


def test_resume_gives_the_same_next_loss(runs):
  full, resumed = runs
  assert resumed.summary['steps'] == K + 1
  loss = full.summary['final_metrics']['loss']
  assert np.isfinite(loss) and resumed.summary['final_metrics']['loss'] == loss


def _rows(workdir, prefix) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if any(k.startswith(prefix + '/') for k in r)]


def test_evaluators_run_every_n_steps_and_at_the_end_on_the_target_params(runs):
  full, resumed = runs
  every, final = full.evaluators
  # The periodic one after each step, on the EMA target the next step starts from ...
  assert len(every.seen) == K + 1
  for seen, (state, _) in zip(every.seen[:K], full.calls[1:], strict=True):
    for key, value in seen.items():
      np.testing.assert_array_equal(value, state['.target_params' + key], err_msg=key)
  assert [r['step'] for r in _rows(full.workdir, 'every')] == [1, 2, 3]
  assert [r['every/calls'] for r in _rows(full.workdir, 'every')] == [1, 2, 3]
  # ... the final one once, on the final target (the last checkpoint's), logged per group.
  (seen,) = final.seen
  _, last = checkpointing.load_checkpoint(full.workdir, step=K + 1)
  for key, value in seen.items():
    np.testing.assert_array_equal(value, _flat(last['target_params'])[key], err_msg=key)
  assert full.summary['final'] == {
    'a': {'calls': 1, 'group_len': 1},
    'bb': {'calls': 1, 'group_len': 2},
  }
  rows = _rows(full.workdir, 'final_a') + _rows(full.workdir, 'final_bb')
  assert [(r['step'], sorted(r)) for r in rows] == [
    (K + 1, ['final_a/calls', 'final_a/group_len', 'step']),
    (K + 1, ['final_bb/calls', 'final_bb/group_len', 'step']),
  ]
  # The resumed run evaluates from where it resumed (its metrics.jsonl continues the copy's).
  assert [len(ev.seen) for ev in resumed.evaluators] == [1, 1]
  # Each step's row once: a resume cuts metrics.jsonl back to the restored step.
  assert [r['step'] for r in _rows(resumed.workdir, 'every')] == [1, 2, 3]
