"""The run directory's files: config.json / plan.json, the resume config check, summary.json."""

import json
import logging
import os

import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.train import plan as plan_lib
from stop_jax.train import workdir as workdir_lib


def _config():
  return config_lib.load_config_file('tiny.py', 'steps=4')


def test_save_config_writes_the_config_and_the_plan_without_schedules(tmp_path):
  config = _config()
  plan = plan_lib.plan_run(config)
  workdir_lib.save_config(config, plan, str(tmp_path / 'run'))
  saved = json.load(open(tmp_path / 'run' / 'config.json'))
  assert saved['total_steps'] == 4 and saved['data']['source'] == 'digits'
  written = json.load(open(tmp_path / 'run' / 'plan.json'))
  assert list(written) == ['num_train_examples', 'steps_per_epoch', 'total_steps', 'mask_spec']
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


def test_write_summary_writes_numbers_as_floats(tmp_path):
  summary = {'steps': 3, 'final_metrics': {'loss': np.float32(0.25)}, 'probe': {}}
  workdir_lib.write_summary(str(tmp_path), summary)
  assert json.load(open(os.path.join(tmp_path, 'summary.json'))) == {
    'steps': 3,
    'final_metrics': {'loss': 0.25},
    'probe': {},
  }
