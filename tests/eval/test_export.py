"""Export of the target encoder, and the export / evaluate command lines end to end on the shared
tiny run."""

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
from stop_jax import models
from stop_jax.eval import export, load
from stop_jax.runtime import checkpointing
from tests.conftest import TINY_RUN_STEPS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow
def test_export_round_trip(tiny_run, tmp_path):
  out = export.export(tiny_run, output=str(tmp_path / 'exported'))
  config, params = export.load_exported(out)
  step, tree = checkpointing.load_checkpoint(tiny_run)
  assert step == TINY_RUN_STEPS
  assert set(params) == {'patch_embed', 'blocks', 'norm'}  # the encoder alone
  target = tree['target_params']
  assert jax.tree.structure(params) == jax.tree.structure(target)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert config.to_dict() == config_lib.load_json(tiny_run).to_dict()
  info = json.load(open(os.path.join(out, export.INFO_FILE)))
  assert info['step'] == TINY_RUN_STEPS and info['num_params'] == sum(
    x.size for x in jax.tree.leaves(target)
  )
  # No predictor, context encoder or Adam moments: a fraction of the checkpoint.
  ckpt_bytes = _dir_bytes(os.path.join(tiny_run, 'checkpoints'))
  assert os.path.getsize(os.path.join(out, export.PARAMS_FILE)) < 0.35 * ckpt_bytes

  encoder = models.build_encoder(config)
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  np.testing.assert_array_equal(
    np.asarray(encoder.apply({'params': params}, images)),
    np.asarray(encoder.apply({'params': target}, images)),
  )
  model = load.load_model(out)
  assert (model.source, model.step) == ('export', TINY_RUN_STEPS)


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
  assert f'tiny_knn (export step {TINY_RUN_STEPS}): last ' in proc.stdout


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
