"""An evaluation as `python -m stop_jax.evaluate` runs it: the eval configs, the task it hands a
protocol, and `run.evaluate` end to end on the shared tiny run (result file, feature cache)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from stop_jax import config as config_lib
from stop_jax.eval import features, load, run
from tests.conftest import TINY_RUN_STEPS


def _eval_config(name, arg=None):
  return config_lib.load_config_file(f'eval/{name}.py', arg)


@pytest.mark.parametrize(
  'name',
  [
    'in1k_1pct',
    'in1k_linear',
    'cifar100',
    'places',
    'inat18',
    'clevr_count',
    'clevr_dist',
    'knn',
    'tiny',
  ],
)
def test_eval_configs_are_valid(name):
  c = _eval_config(name)
  config_lib.validate(c)
  assert c.eval.feature_types == ('last', 'last4')
  with pytest.raises(AttributeError):
    c.eval.not_a_key = 1  # locked


def test_eval_config_checks_name_the_key():
  c = _eval_config('tiny')
  c.eval.protocol = 'svm'
  with pytest.raises(config_lib.ConfigError, match=r'eval\.protocol'):
    config_lib.validate(c)
  c = _eval_config('tiny')
  c.eval.feature_types = ('last', 'last')
  with pytest.raises(config_lib.ConfigError, match=r'eval\.feature_types'):
    config_lib.validate(c)
  c = _eval_config('tiny')
  c.eval.linear_crop_scale = (0.5, 1.5)
  with pytest.raises(config_lib.ConfigError, match=r'eval\.linear_crop_scale'):
    config_lib.validate(c)


def _model(tmp_path, image_size=32):
  run_config = config_lib.base_config()
  run_config.model.image_size = image_size
  return load.LoadedModel(run_config, {}, 7, 'checkpoint', str(tmp_path))


def test_make_task(tmp_path):
  model = _model(tmp_path)
  config = load.merge_configs(model.config, _eval_config('tiny'))
  task = run.make_task(config, model, depth=12)
  assert task.feature_types == ('last', 'last4')
  assert task.train.split == 'train' and task.test.split == 'test'
  assert task.train.image_size == task.test.image_size == 32  # the model's, as eval.image_size=0
  assert task.cache_dir == os.path.join(str(tmp_path), 'eval', 'cache')
  assert task.model == {'source': 'checkpoint', 'path': str(tmp_path), 'step': 7}
  config.eval.cache_features = False
  assert run.make_task(config, model, depth=12).cache_dir is None


def test_make_task_rejects_bad_sizes_and_types(tmp_path):
  model = _model(tmp_path)
  config = load.merge_configs(model.config, _eval_config('tiny'))
  config.eval.image_size = 30
  with pytest.raises(config_lib.ConfigError, match='image_size=30 is not allowed'):
    run.make_task(config, model, depth=12)
  config.eval.image_size = 0
  with pytest.raises(ValueError, match='depth >= 4'):
    run.make_task(config, model, depth=2)


def test_summary_line():
  record = {
    'name': 'tiny_knn',
    'model': {'source': 'export', 'step': 3},
    'results': {'last': {'top1': 0.5}, 'last4': {'top1': 0.75}},
    'best': {'feature_type': 'last4'},
  }
  line = run.summary_line(record, '/w/eval/tiny_knn.json')
  assert (
    line
    == 'tiny_knn (export step 3): last 50.00% | last4 75.00% -> best last4 [/w/eval/tiny_knn.json]'
  )
  record['model']['step'] = None
  assert run.summary_line(record, 'p').startswith('tiny_knn (export): last 50.00%')


@pytest.mark.slow
def test_evaluate_logreg_writes_json_and_reuses_cached_features(tiny_run, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir)  # tiny_run is shared: evaluate writes into its copy
  config = _eval_config('tiny')
  config.eval.probe_l2 = (1e-2,)
  record = run.evaluate(config, workdir)
  saved = json.load(open(os.path.join(workdir, 'eval', 'tiny_logreg.json')))
  assert saved['model']['step'] == TINY_RUN_STEPS and saved['model']['source'] == 'checkpoint'
  for t in ('last', 'last4'):
    res = saved['results'][t]
    assert 0.5 < res['top1'] <= 1.0 and res['num_test'] == 360
  assert saved['results']['last4']['dim'] == 4 * saved['results']['last']['dim']
  assert saved['best']['top1'] == max(r['top1'] for r in saved['results'].values())
  assert record['name'] == 'tiny_logreg'
  cache = os.path.join(workdir, 'eval', 'cache')
  assert len(os.listdir(cache)) == 4  # {train, test} x {last, last4}

  # Another l2 grid on the same checkpoint: features come from the cache, the encoder never runs.
  def no_extraction(*args, **kwargs):
    raise AssertionError('features were recomputed')

  monkeypatch.setattr(features, 'FeatureExtractor', no_extraction)
  config.eval.probe_l2 = (1e-3, 1e-1)
  again = run.evaluate(config, workdir)
  assert again['results']['last']['l2'] in (1e-3, 1e-1)
  assert len(os.listdir(cache)) == 4
