"""Loading the encoder to evaluate (runs, exports, converted params), merging configs, naming."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.eval import converted, export, load
from stop_jax.runtime import checkpointing
from tests.conftest import TINY_RUN_STEPS


def _eval_config(name, arg=None):
  return config_lib.load_config_file(f'eval/{name}.py', arg)


def test_merge_and_result_name():
  run = config_lib.base_config()
  run.model.variant, run.seed = 'small', 7
  ev = _eval_config('clevr_count')
  merged = load.merge_configs(run, ev)
  assert merged.model.variant == 'small' and merged.eval.label == 'clevr_count'
  assert merged.seed == ev.seed
  assert load.result_name(merged) == 'clevr_count'
  merged = load.merge_configs(run, _eval_config('tiny', 'protocol=knn'))
  assert load.result_name(merged) == 'tiny_knn'


def test_result_name_without_eval_name():
  c = config_lib.base_config()
  c.eval.name, c.eval.protocol = '', 'knn'
  c.eval.source, c.eval.dataset = 'tfds', 'imagenet2012_subset/1pct'
  assert load.result_name(c) == 'knn_imagenet2012_subset_1pct'
  c.eval.source, c.eval.data_dir = 'folder', '/data/places365/'
  assert load.result_name(c) == 'knn_places365'
  c.eval.source, c.eval.label = 'tfds', 'clevr_count'
  c.eval.dataset = 'clevr'
  assert load.result_name(c) == 'knn_clevr_clevr_count'


def _export(directory, step=3):
  """A tiny export of made-up params: no training needed."""
  config = config_lib.lock(config_lib.base_config())
  params = {'patch_embed': {'w': np.arange(6, dtype=np.float32)}, 'norm': {'b': np.ones(2)}}
  export.save_exported(str(directory), config, params, {'step': step})
  return params


def test_load_model_of_an_export(tmp_path):
  params = _export(tmp_path)
  model = load.load_model(str(tmp_path))
  assert (model.source, model.step, model.path) == ('export', 3, str(tmp_path))
  np.testing.assert_array_equal(model.params['patch_embed']['w'], params['patch_embed']['w'])
  assert model.config.model.variant == config_lib.base_config().model.variant
  assert load.load_model(str(tmp_path), step=3).step == 3
  with pytest.raises(ValueError, match='--step=1, but the export'):
    load.load_model(str(tmp_path), step=1)
  assert load.model_identity(model) == {'source': 'export', 'path': str(tmp_path), 'step': 3}


def test_missing_or_unknown_directories_fail_with_a_clear_message(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    load.load_model(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match='is neither a run'):
    load.load_model(str(tmp_path))


def test_load_model_of_a_converted_checkpoint(tmp_path):
  config = config_lib.lock(config_lib.base_config())
  encoder = {'patch_embed': {'w': np.arange(4, dtype=np.float32)}}
  params = {'target_encoder': encoder, 'predictor': {'w': np.zeros(2, np.float32)}}
  converted.write_converted(str(tmp_path), config, params, {'source': 'made up'})
  # Recognised by its marker, although it has checkpoints/0 like a run.
  model = load.load_model(str(tmp_path))
  assert (model.source, model.step) == ('converted', None)
  np.testing.assert_array_equal(model.params['patch_embed']['w'], encoder['patch_embed']['w'])
  with pytest.raises(ValueError, match='--step=0 does not apply to the converted checkpoint'):
    load.load_model(str(tmp_path), step=0)


def test_converted_params_give_their_encoder():
  encoder = {'patch_embed': {}, 'blocks': {}}
  assert load._encoder_params(encoder, 'p') is encoder
  both = {'predictor': {'patch_embed': 0}, 'target_encoder': encoder}
  assert load._encoder_params(both, 'p') is encoder
  with pytest.raises(ValueError, match="p: converted params have no encoder.*'predictor'"):
    load._encoder_params({'predictor': {}}, 'p')


@pytest.mark.slow
def test_load_model_of_a_run(tiny_run):
  model = load.load_model(tiny_run)
  assert (model.source, model.step) == ('checkpoint', TINY_RUN_STEPS)
  step, tree = checkpointing.load_checkpoint(tiny_run)
  for a, b in zip(
    jax.tree.leaves(model.params), jax.tree.leaves(tree['target_params']), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert model.config.to_dict() == config_lib.load_json(tiny_run).to_dict()
