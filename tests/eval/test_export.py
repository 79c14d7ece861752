"""Export of the target encoder, and the evaluate / export CLIs end to end on a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax import evaluate, models
from stop_jax.eval import export, features
from stop_jax.runtime import checkpointing
from stop_jax.train import loop as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """configs/tiny.py trained for 2 steps (no probe): a real run directory."""
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  config = config_lib.load_config_file('tiny.py', 'steps=2')
  config.eval.probe = False
  trainer.train_and_evaluate(config, workdir)
  return workdir


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow
def test_export_round_trip(tiny_run, tmp_path):
  out = export.export(tiny_run, output=str(tmp_path / 'exported'))
  config, params = export.load_exported(out)
  step, tree = checkpointing.load_checkpoint(tiny_run)
  assert step == 2
  assert set(params) == {'patch_embed', 'blocks', 'norm'}  # the encoder alone
  target = tree['target_params']
  assert jax.tree.structure(params) == jax.tree.structure(target)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert config.to_dict() == config_lib.load_json(tiny_run).to_dict()
  info = json.load(open(os.path.join(out, export.INFO_FILE)))
  assert info['step'] == 2 and info['num_params'] == sum(x.size for x in jax.tree.leaves(target))
  # No predictor, context encoder or Adam moments: a fraction of the checkpoint.
  ckpt_bytes = _dir_bytes(os.path.join(tiny_run, 'checkpoints'))
  assert os.path.getsize(os.path.join(out, export.PARAMS_FILE)) < 0.35 * ckpt_bytes

  encoder = models.build_encoder(config)
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  np.testing.assert_array_equal(
    np.asarray(encoder.apply({'params': params}, images)),
    np.asarray(encoder.apply({'params': target}, images)),
  )
  model = evaluate.load_model(out)
  assert (model.source, model.step) == ('export', 2)
  with pytest.raises(ValueError, match='--step=1, but the export'):
    evaluate.load_model(out, step=1)


@pytest.mark.slow
def test_evaluate_logreg_writes_json_and_reuses_cached_features(tiny_run, monkeypatch):
  config = config_lib.load_config_file('eval/tiny.py')
  config.eval.probe_l2 = (1e-2,)
  record = evaluate.evaluate(config, tiny_run)
  path = os.path.join(tiny_run, 'eval', 'tiny_logreg.json')
  saved = json.load(open(path))
  assert saved['model']['step'] == 2 and saved['model']['source'] == 'checkpoint'
  for t in ('last', 'last4'):
    res = saved['results'][t]
    assert 0.5 < res['top1'] <= 1.0 and res['num_test'] == 360
  assert saved['results']['last4']['dim'] == 4 * saved['results']['last']['dim']
  assert saved['best']['top1'] == max(r['top1'] for r in saved['results'].values())
  assert record['name'] == 'tiny_logreg'
  cache = os.path.join(tiny_run, 'eval', 'cache')
  assert len(os.listdir(cache)) == 4  # {train, test} x {last, last4}

  # Another l2 grid on the same checkpoint: features come from the cache, the encoder never runs.
  def no_extraction(*args, **kwargs):
    raise AssertionError('features were recomputed')

  monkeypatch.setattr(features, 'FeatureExtractor', no_extraction)
  config.eval.probe_l2 = (1e-3, 1e-1)
  again = evaluate.evaluate(config, tiny_run)
  assert again['results']['last']['l2'] in (1e-3, 1e-1)
  assert len(os.listdir(cache)) == 4


@pytest.mark.slow
def test_export_and_evaluate_command_lines(tiny_run, tmp_path):
  out = str(tmp_path / 'cli_export')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  run = lambda *args: subprocess.run(  # noqa: E731
    [sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True
  )
  proc = run('stop_jax.eval.export', f'--workdir={tiny_run}', f'--output={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert export.is_export_dir(out)
  proc = run('stop_jax.evaluate', '--config=configs/eval/tiny.py:protocol=knn', f'--workdir={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.load(open(os.path.join(out, 'eval', 'tiny_knn.json')))
  assert set(saved['results']) == {'last', 'last4'}
  assert all(0.1 < r['top1'] <= 1.0 for r in saved['results'].values())
  assert 'tiny_knn (export step 2): last ' in proc.stdout


def test_bfloat16_params_survive_the_round_trip(tmp_path):
  params = {
    'norm': {'scale': jnp.linspace(0, 1, 5, dtype=jnp.bfloat16), 'bias': np.zeros(5, np.float32)}
  }
  config = config_lib.lock(config_lib.base_config())
  info = export.save_exported(str(tmp_path), config, params, {'step': 3})
  assert info['bfloat16_params'] == ['norm/scale'] and info['step'] == 3
  _, loaded = export.load_exported(str(tmp_path))
  assert loaded['norm']['scale'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(loaded['norm']['scale'], np.asarray(params['norm']['scale']))
  assert loaded['norm']['bias'].dtype == np.float32


def test_config_from_dict_keeps_values_and_skips_unknown_keys():
  saved = config_lib.base_config().to_dict()
  saved['model']['variant'] = 'small'
  saved['mask']['target_scale'] = [0.1, 0.2]  # JSON turns tuples into lists
  saved['model']['retired_key'] = 1
  config = config_lib.from_dict(saved, strict=False)
  assert config.model.variant == 'small' and config.mask.target_scale == (0.1, 0.2)
  assert 'retired_key' not in config.model
  with pytest.raises(AttributeError):
    config.model.retired_key = 2  # locked
  assert isinstance(config, ml_collections.ConfigDict)


def test_missing_directories_fail_with_a_clear_message(tmp_path):
  with pytest.raises(FileNotFoundError, match='stop_jax.eval.export --workdir'):
    export.load_exported(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    evaluate.load_model(str(tmp_path / 'nope'))
