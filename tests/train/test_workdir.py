"""The run directory's files: config.json / plan.json, the resume config check, summary.json."""

import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.train import plan as plan_lib
from stop_jax.train import workdir as workdir_lib
from tests.subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _config():
  return config_lib.load_config_file('tiny.py', 'steps=4')


def test_save_config_writes_the_config_and_the_plan_without_schedules(tmp_path):
  config = _config()
  plan = plan_lib.plan_run(config)
  workdir_lib.save_config(config, plan, str(tmp_path / 'run'))
  saved = json.load(open(tmp_path / 'run' / 'config.json'))
  assert saved['total_steps'] == 4 and saved['data']['source'] == 'digits'
  written = json.load(open(tmp_path / 'run' / 'plan.json'))
  assert list(written) == [
    'num_train_examples',
    'steps_per_epoch',
    'total_steps',
    'mask_spec',
    'mask_tokens',
    'data',
  ]
  assert written['num_train_examples'] == 1437 and written['steps_per_epoch'] == 1437 // 128
  assert written['total_steps'] == 4 and written['mask_spec']['grid'] == [8, 8]
  # The schedules are built once, from the same steps per epoch.
  assert plan.schedules.warmup_steps == int(config.optim.warmup_epochs * plan.steps_per_epoch)


def test_config_changes_ignore_run_control_keys_and_tuples_vs_lists():
  old = json.loads(_config().to_json_best_effort())
  new = _config()
  new.total_steps, new.log_every_steps, new.checkpoint.keep = 10, 1, 7
  new.eval.knn_every_steps, new.xla_cpu_matmul, new.on_nonfinite = 5, 'eigen', 'skip'
  assert workdir_lib.config_changes(old, json.loads(new.to_json_best_effort())) == []
  new.optim.lr, new.stop.sigma = 2e-3, 0.5
  assert workdir_lib.config_changes(old, json.loads(new.to_json_best_effort())) == [
    'optim.lr: 0.001 -> 0.002',
    'stop.sigma: 0.25 -> 0.5',
  ]


def test_check_workdir_config_refuses_another_config_unless_allowed(tmp_path, caplog):
  config = _config()
  workdir_lib.check_workdir_config(config, str(tmp_path))  # no config.json yet: nothing to check
  workdir_lib.save_config(config, plan_lib.plan_run(config), str(tmp_path))
  workdir_lib.check_workdir_config(config, str(tmp_path))  # the same config
  other = _config()
  other.optim.lr = 2e-3
  with pytest.raises(config_lib.ConfigError) as info:
    workdir_lib.check_workdir_config(other, str(tmp_path))
  assert f'{tmp_path} holds a run with another config:\n  optim.lr: 0.001 -> 0.002' in str(
    info.value
  )
  assert '--config.checkpoint.allow_config_change=True' in str(info.value)
  other.checkpoint.allow_config_change = True
  with caplog.at_level(logging.WARNING):
    workdir_lib.check_workdir_config(other, str(tmp_path))
  assert 'optim.lr: 0.001 -> 0.002' in caplog.text


def test_write_summary_is_strict_json_with_non_finite_values_as_strings(tmp_path):
  summary = {'final_metrics': {'loss': np.float32('nan'), 'grad_norm': float('inf')}, 'n': 2}
  workdir_lib.write_summary(str(tmp_path), summary)

  def reject(name):
    raise AssertionError(f'summary.json holds the non-JSON constant {name}')

  text = open(os.path.join(tmp_path, 'summary.json')).read()
  assert json.loads(text, parse_constant=reject) == {
    'final_metrics': {'loss': 'NaN', 'grad_norm': 'Infinity'},
    'n': 2,
  }


def test_write_summary_writes_numbers_as_floats(tmp_path):
  summary = {'steps': 3, 'final_metrics': {'loss': np.float32(0.25)}, 'probe': {}}
  workdir_lib.write_summary(str(tmp_path), summary)
  assert json.load(open(os.path.join(tmp_path, 'summary.json'))) == {
    'steps': 3,
    'final_metrics': {'loss': 0.25},
    'probe': {},
  }


def test_check_shared_round_trips_a_token_and_leaves_nothing_behind(tmp_path):
  workdir = str(tmp_path / 'new_run')
  workdir_lib.check_shared(workdir)  # creates the workdir, writes, reads back, removes
  assert os.listdir(workdir) == []


def test_check_shared_names_a_workdir_process_0_cannot_write(tmp_path):
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(workdir_lib.WorkdirError) as info:
    workdir_lib.check_shared(str(tmp_path / 'a_file' / 'run'))
  message = str(info.value)
  assert message.startswith(f'workdir {tmp_path / "a_file" / "run"} cannot be written by process 0')
  assert 'Workdirs on GCS' in message and '\n' not in message


def test_check_shared_refuses_a_workdir_where_the_token_is_not_seen(tmp_path, monkeypatch):
  # What a process sees when the path is another host's local disk: an older token, or none.
  monkeypatch.setattr(workdir_lib.fileio, 'read_text', lambda path: 'stale token')
  with pytest.raises(workdir_lib.WorkdirError) as info:
    workdir_lib.check_shared(str(tmp_path))
  assert str(info.value) == (
    f'workdir {tmp_path} is not shared between processes: process 0 cannot see '
    f'{tmp_path}/.stop_jax_shared_check written by process 0; use a gs:// path or a shared '
    'filesystem mounted at the same path on every host.'
  )


_TWO_PROCESS_CHECK = """
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, index, shared, own = sys.argv[1:]
jax.distributed.initialize(f'localhost:{port}', 2, int(index))
from stop_jax.train import workdir as workdir_lib
workdir_lib.check_shared(shared)
print('shared: ok', flush=True)
try:
  workdir_lib.check_shared(own)
except workdir_lib.WorkdirError as e:
  print(f'own: {e}', flush=True)
"""


@pytest.mark.slow
def test_two_processes_accept_a_shared_workdir_and_both_refuse_separate_ones(tmp_path):
  # Each process's "own" directory stands for a path that is local to each host.
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _TWO_PROCESS_CHECK, str(port), str(i)]
      + [str(tmp_path / 'shared'), str(tmp_path / f'own{i}')],
      cwd=ROOT,
      env=cpu_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, out[-4000:]
    assert 'shared: ok' in out, out[-4000:]
    own = tmp_path / f'own{i}'
    # Both processes stop with the same verdict: process 1 cannot see process 0's token.
    assert (
      f'own: workdir {own} is not shared between processes: process 1 cannot see '
      f'{own}/.stop_jax_shared_check written by process 0'
    ) in out, out[-4000:]
  assert os.listdir(tmp_path / 'shared') == [] and os.listdir(tmp_path / 'own0') == []
