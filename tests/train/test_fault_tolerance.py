"""Crashes, preemptions and device-count changes of real `python -m stop_jax.main` processes.

Every interrupted run is compared with one uninterrupted run of the same command (the `baseline`
fixture, computed once per test session even under pytest-xdist): same loss at every step, same
final params, EMA target and optimiser state.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from stop_jax.runtime import checkpointing, distributed
from tests.subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 24
TRAIN_ARGS = [
  f'--config=configs/tiny.py:steps={STEPS}',
  '--config.model.depth=2',
  '--config.predictor.depth=1',
  '--config.data.global_batch_size=32',
  '--config.log_every_steps=1',
  '--config.eval.probe=False',
  '--config.checkpoint.every_steps=5',
  '--config.checkpoint.every_minutes=0',
]
TIMEOUT_S = 300
RESUMED = re.compile(r'resuming from checkpoint at step (\d+)')


def _start(workdir, log_path, *extra, args=TRAIN_ARGS, devices=None) -> subprocess.Popen:
  with open(log_path, 'w') as log:  # a file, not a pipe: a chatty child never blocks on it
    return subprocess.Popen(
      [sys.executable, '-m', 'stop_jax.main', *args, f'--workdir={workdir}', *extra],
      cwd=ROOT,
      env=cpu_env(devices),
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def _run(workdir, log_path, *extra, **kwargs) -> str:
  """Runs the command to the end; returns its log (asserting exit code 0)."""
  proc = _start(workdir, log_path, *extra, **kwargs)
  try:
    proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  log = open(log_path).read()
  assert proc.returncode == 0, f'exit code {proc.returncode}:\n{log[-6000:]}'
  return log


def _wait_for(proc, condition, interval_s: float) -> bool:
  """Polls `condition()` until it holds (True) or `proc` ends or time runs out (False)."""
  deadline = time.monotonic() + TIMEOUT_S
  while proc.poll() is None and time.monotonic() < deadline:
    if condition():
      return True
    time.sleep(interval_s)
  return False


def _kill(proc):
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  proc.wait()


def _entries(workdir) -> list[tuple[int, float]]:
  """(step, loss) of every metrics.jsonl line, in order (a resumed run appends)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [(x['step'], x['loss']) for x in map(json.loads, f) if 'loss' in x]


def _last_logged(workdir) -> int:
  return max((s for s, _ in _entries(workdir)), default=0)


def _committed(workdir) -> list[int]:
  """Steps with a finished checkpoint directory (orbax renames a step's tmp dir when done)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def baseline(tmp_path_factory) -> dict:
  """The uninterrupted run: {'losses': {step: loss}, 'final': flat tree at step STEPS}."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # shared by all workers of this pytest session
  workdir = root / 'fault_tolerance_baseline'
  with open(root / 'fault_tolerance_baseline.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker trains, the others wait and reuse it
    if not (root / 'fault_tolerance_baseline.done').exists():
      shutil.rmtree(workdir, ignore_errors=True)
      _run(workdir, root / 'fault_tolerance_baseline.log')
      (root / 'fault_tolerance_baseline.done').touch()
  entries = _entries(workdir)
  assert [s for s, _ in entries] == list(range(1, STEPS + 1))
  step, tree = checkpointing.load_checkpoint(str(workdir))
  assert step == STEPS
  return {'losses': dict(entries), 'final': _flat(tree), 'workdir': workdir}


def _assert_same_as_baseline(workdir, baseline):
  """Every logged loss (recomputed steps included) and the final state match the baseline."""
  entries = _entries(workdir)
  assert sorted({s for s, _ in entries}) == list(range(1, STEPS + 1))
  for step, loss in entries:
    np.testing.assert_allclose(loss, baseline['losses'][step], rtol=1e-6, err_msg=f'step {step}')
  step, tree = checkpointing.load_checkpoint(str(workdir))
  assert step == STEPS
  final = _flat(tree)
  assert final.keys() == baseline['final'].keys()
  for key, value in final.items():  # params, target_params, opt_state
    np.testing.assert_allclose(value, baseline['final'][key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_matches_the_uninterrupted_run(baseline, tmp_path):
  workdir = tmp_path / 'run'
  proc = _start(workdir, tmp_path / 'killed.log')
  try:
    # Saves are asynchronous: step 10's may still be in flight, so also wait for step 5's.
    reached = _wait_for(
      proc, lambda: _last_logged(workdir) >= 12 and _committed(workdir), interval_s=0.002
    )
  finally:
    _kill(proc)
  assert reached, open(tmp_path / 'killed.log').read()[-6000:]
  assert proc.returncode == -signal.SIGKILL
  killed_at, committed = _last_logged(workdir), _committed(workdir)
  assert 12 <= killed_at < STEPS and committed and max(committed) <= killed_at, committed

  log = _run(workdir, tmp_path / 'rerun.log')  # the same command
  assert int(RESUMED.search(log).group(1)) == max(committed)
  _assert_same_as_baseline(workdir, baseline)


def _partial_step_10(workdir) -> str | None:
  """Name of step 10's temporary directory while orbax is writing into it, else None."""
  directory = os.path.join(workdir, 'checkpoints')
  try:
    for name in os.listdir(directory):
      # orbax 0.12.8: '10.orbax-checkpoint-tmp' (older versions append a timestamp).
      if re.fullmatch(r'10\.orbax-checkpoint-tmp.*', name):
        if os.listdir(os.path.join(directory, name)):  # something written, not finalised
          return name
  except FileNotFoundError:  # not created yet, or renamed between the two listings
    pass
  return None


@pytest.mark.slow
def test_kill_9_mid_save_never_becomes_latest_and_rerun_matches(baseline, tmp_path):
  workdir = tmp_path / 'run'
  # A save of this tiny state takes a few ms; if the kill lands after the rename, try again.
  for attempt in range(3):
    shutil.rmtree(workdir, ignore_errors=True)
    proc = _start(workdir, tmp_path / f'killed{attempt}.log')
    try:
      seen = _wait_for(proc, lambda: _partial_step_10(workdir), interval_s=0.001)
    finally:
      _kill(proc)
    assert seen, (
      'never saw step 10 being written:\n' + open(tmp_path / 'killed0.log').read()[-6000:]
    )
    if 10 not in _committed(workdir):
      break
  assert proc.returncode == -signal.SIGKILL
  assert _committed(workdir) == [5], f'kill never landed inside the save: {_committed(workdir)}'
  assert _partial_step_10(workdir)  # the partial step is still on disk ...
  assert checkpointing.load_checkpoint(str(workdir))[0] == 5  # ... but is not a checkpoint

  log = _run(workdir, tmp_path / 'rerun.log')
  assert int(RESUMED.search(log).group(1)) == 5
  _assert_same_as_baseline(workdir, baseline)


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_rerun_matches(baseline, tmp_path):
  workdir = tmp_path / 'run'
  # Only final (and preemption) saves: any checkpoint before the end comes from the SIGTERM.
  no_periodic = '--config.checkpoint.every_steps=0'
  proc = _start(workdir, tmp_path / 'preempted.log', no_periodic)
  try:
    reached = _wait_for(proc, lambda: _last_logged(workdir) >= 8, interval_s=0.002)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=TIMEOUT_S)
  finally:
    _kill(proc)
  log = open(tmp_path / 'preempted.log').read()
  assert reached, log[-6000:]
  assert proc.returncode == distributed.PREEMPTED_EXIT_CODE, log[-6000:]  # 75: resume me
  ckpt_dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  match = re.search(rf'preempted: saved step (\d+) in {re.escape(ckpt_dir)}; rerun the same', log)
  assert match, log[-3000:]
  saved = int(match.group(1))
  assert 8 <= saved < STEPS
  assert _committed(workdir) == [saved]  # a non-periodic save, at the step it announced
  assert checkpointing.load_checkpoint(str(workdir))[0] == saved
  # Nothing lost: every step up to the saved one was logged once, none after it.
  assert [s for s, _ in _entries(workdir)] == list(range(1, saved + 1))

  log = _run(workdir, tmp_path / 'rerun.log', no_periodic)
  assert int(RESUMED.search(log).group(1)) == saved
  assert [s for s, _ in _entries(workdir)] == list(range(1, STEPS + 1))  # nothing recomputed
  _assert_same_as_baseline(workdir, baseline)


@pytest.mark.slow
def test_checkpoint_saved_on_8_devices_resumes_on_4_with_the_same_next_loss(tmp_path):
  args = [
    '--config=configs/tiny.py:steps=3',
    *(a for a in TRAIN_ARGS[1:] if not a.startswith('--config.checkpoint.every_steps')),
    '--config.checkpoint.every_steps=1',
  ]
  on8, on4 = tmp_path / 'on8', tmp_path / 'on4'
  log8 = _run(on8, tmp_path / 'on8.log', args=args, devices=8)
  assert '8 global devices' in log8
  assert _committed(on8) == [1, 2, 3]
  shutil.copytree(on8, on4)
  shutil.rmtree(on4 / 'checkpoints' / '3')  # resume from step 2, run step 3 again

  log4 = _run(on4, tmp_path / 'on4.log', args=args, devices=4)
  assert '4 global devices' in log4
  assert int(RESUMED.search(log4).group(1)) == 2
  (step8, loss8), (step4, loss4) = _entries(on8)[-1], _entries(on4)[-1]
  # Steps 1, 2, 3: the rerun cut the file back to step 2 before logging step 3 again.
  assert step8 == step4 == 3 and [s for s, _ in _entries(on4)] == [1, 2, 3]
  np.testing.assert_allclose(loss4, loss8, rtol=1e-5)
  _, tree8 = checkpointing.load_checkpoint(str(on8))
  _, tree4 = checkpointing.load_checkpoint(str(on4))
  for key, value in _flat(tree4['params']).items():
    np.testing.assert_allclose(value, _flat(tree8['params'])[key], rtol=1e-4, atol=1e-6)


def _snapshot(workdir) -> dict[str, bytes]:
  """Every file of the run directory: relative path -> content."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      files[os.path.relpath(path, workdir)] = open(path, 'rb').read()
  return files


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_so_exits_0_and_changes_nothing(baseline, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(baseline['workdir'], workdir)
  before = _snapshot(workdir)
  assert json.loads(before['summary.json'])['final_metrics']['loss'] > 0
  started = time.monotonic()
  log = _run(workdir, tmp_path / 'rerun.log')  # the same command; asserts exit status 0
  took = time.monotonic() - started
  summary = os.path.join(os.path.abspath(workdir), 'summary.json')
  assert f'already complete at step {STEPS} (summary: {summary})' in log, log[-3000:]
  # Nothing compiled, probed or appended; not one file of the run changed.
  assert 'compiled the train step' not in log and 'resuming from' not in log
  assert _snapshot(workdir) == before
  assert took < 120, took  # start-up only
