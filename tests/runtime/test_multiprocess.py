"""Real multi-process runs of `python -m stop_jax.main` on localhost (jax.distributed, gloo).

Two processes with two CPU devices each stand in for two slices (the hybrid ICI x DCN mesh, each
process a granule); two processes with one device each are preempted by a SIGTERM and resumed.
Each is compared with one process driving as many devices, with the same global batch and mesh.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from stop_jax.runtime import checkpointing, distributed
from tests.subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
  '--config.model.depth=2',  # the multi-process path is the same at any depth; compiles faster
  '--config.predictor.depth=1',
  '--config.eval.probe=False',
  '--config.log_every_steps=1',
]
TIMEOUT_S = 540
PREEMPTED = re.compile(r'preempted: saved step (\d+) in (\S+); rerun the same')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(workdir, log_path, args, devices: int) -> subprocess.Popen:
  with open(log_path, 'w') as log:  # a file, not a pipe: a chatty child never blocks on it
    return subprocess.Popen(
      [sys.executable, '-m', 'stop_jax.main', *args, f'--workdir={workdir}'],
      cwd=ROOT,
      env=cpu_env(devices),
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def _start_two(workdir, logs, args, devices: int) -> list[subprocess.Popen]:
  """Processes 0 and 1 of one run, meeting on a free localhost port; process i logs to logs[i]."""
  hand = [f'--coordinator_address=localhost:{_free_port()}', '--num_processes=2']
  return [_start(workdir, logs[i], [*args, *hand, f'--process_id={i}'], devices) for i in range(2)]


def _finish(procs, log_paths, expected: int = 0) -> list[str]:
  """Waits for all to exit with `expected`; if one fails the others are killed (they would wait
  for it at a collective). Returns the logs."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, expected) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [open(path).read() for path in log_paths]
  for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
    assert p.returncode == expected, f'process {i} exited with {p.returncode}:\n{log[-6000:]}'
  return logs


def _entries(workdir) -> list[tuple[int, float]]:
  """(step, loss) of every metrics.jsonl line, in order (a resumed run appends)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [(x['step'], x['loss']) for x in map(json.loads, f) if 'loss' in x]


def _committed(workdir) -> list[int]:
  """Steps with a finished checkpoint directory (orbax renames a step's tmp dir when done)."""
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _final_state(workdir, steps: int) -> dict:
  step, tree = checkpointing.load_checkpoint(str(workdir))
  assert step == steps
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def _assert_same_run(workdir, reference, steps: int, rtol: float, atol: float):
  """Same loss at every step and the same final state (params, EMA target, optimiser state)."""
  got, want = _entries(workdir), _entries(reference)
  assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, steps + 1))
  np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=rtol)
  assert want[0][1] != want[-1][1]  # the params did move
  final, expected = _final_state(workdir, steps), _final_state(reference, steps)
  assert final.keys() == expected.keys() and len(final) > 10
  for key, value in final.items():
    np.testing.assert_allclose(value, expected[key], rtol=rtol, atol=atol, err_msg=key)


# One test, not several sharing a fixture: under pytest-xdist each worker would redo the training.
@pytest.mark.slow
def test_two_processes_as_two_slices_train_like_one_process(tmp_path):
  """The hybrid mesh: data spans the two processes over 'DCN', fsdp stays inside each."""
  args = ['--config=configs/tiny.py:steps=3', *TINY, '--config.mesh.data=2', '--config.mesh.fsdp=2']
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  logs = [tmp_path / 'process0.log', tmp_path / 'process1.log']
  workers = _start_two(multi, logs, [*args, '--config.mesh.dcn_data=2'], devices=2)
  # The reference meanwhile: one process, four devices, the same (data 2, fsdp 2) mesh.
  reference = _start(single, tmp_path / 'single.log', args, devices=4)
  logs = _finish(workers, logs)
  _finish([reference], [tmp_path / 'single.log'])

  assert 'process 0 of 2: 2 local devices (cpu), 4 global devices' in logs[0]
  assert 'process 1 of 2: 2 local devices (cpu), 4 global devices' in logs[1]
  assert (
    "hybrid mesh {'data': 2, 'fsdp': 2, 'tensor': 1} over 2 process(es)" in logs[0]
    and "per slice (ICI) {'data': 1, 'fsdp': 2, 'tensor': 1}" in logs[0]
  )
  assert 'plan:' in logs[0] and 'plan:' not in logs[1]  # only process 0 logs at INFO
  # Cross-process all-reduces (gloo) add in another order than in-process ones: float tolerance.
  _assert_same_run(multi, single, steps=3, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_preempted_by_sigterm_save_once_exit_75_and_resume_exactly(tmp_path):
  steps = 16
  args = [
    f'--config=configs/tiny.py:steps={steps}',
    *TINY,
    '--config.data.global_batch_size=32',
    '--config.checkpoint.every_steps=0',  # only final and preemption saves
    '--config.checkpoint.every_minutes=0',
  ]
  run, single = tmp_path / 'run', tmp_path / 'single'
  logs = [tmp_path / 'process0.log', tmp_path / 'process1.log']
  workers = _start_two(run, logs, args, devices=1)
  reference = _start(single, tmp_path / 'single.log', args, devices=2)  # uninterrupted
  deadline = time.monotonic() + TIMEOUT_S
  while max((s for s, _ in _entries(run)), default=0) < 5:
    if any(p.poll() is not None for p in workers) or time.monotonic() > deadline:
      for p in [*workers, reference]:
        p.kill()
        p.wait()
      pytest.fail('never reached step 5:\n' + open(logs[0]).read()[-6000:])
    time.sleep(0.002)
  # As a scheduler preempting one host: only process 1 gets the signal, process 0 learns of it
  # through JAX's preemption sync service.
  workers[1].send_signal(signal.SIGTERM)
  logs_text = _finish(workers, logs, expected=distributed.PREEMPTED_EXIT_CODE)
  _finish([reference], [tmp_path / 'single.log'])

  saved = [PREEMPTED.search(log) for log in logs_text]
  assert all(saved), [log[-3000:] for log in logs_text]
  saved_steps = {int(m.group(1)) for m in saved}
  assert len(saved_steps) == 1, saved_steps  # both processes stopped after the same step
  (at,) = saved_steps
  assert 5 <= at < steps
  assert _committed(run) == [at]  # one save, at the step both announced
  assert [s for s, _ in _entries(run)] == list(range(1, at + 1))  # each step logged once
  assert 'exiting with status 75' in logs_text[0] and 'exiting with status 75' in logs_text[1]

  rerun_logs = [tmp_path / 'rerun0.log', tmp_path / 'rerun1.log']
  rerun_text = _finish(_start_two(run, rerun_logs, args, devices=1), rerun_logs)
  assert f'resuming from checkpoint at step {at}' in rerun_text[0]
  assert _committed(run) == [at, steps]
  # Two processes with one device each against one process with two: the same mesh, and every
  # cross-device sum has two addends, so the order of the all-reduce cannot matter: bitwise.
  _assert_same_run(run, single, steps=steps, rtol=0, atol=0)
