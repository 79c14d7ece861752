"""config.loading: saved config.json back to a locked config; config-file arguments; file lookup."""

import json
import os

import pytest

from stop_jax import config as config_lib


def test_from_dict_restores_tuples_keeps_defaults_and_locks():
  saved = json.loads(config_lib.base_config().to_json())
  saved['stop'] = {'sigma': 0.7}  # keys the values lack keep their defaults
  back = config_lib.from_dict(saved)
  assert back.stop.sigma == 0.7 and back.stop.mode == 'masked'
  assert back.mask.target_scale == (0.15, 0.2) and isinstance(back.data.crop_scale, tuple)
  with pytest.raises(AttributeError):
    back.stop.sgima = 0.1


def test_from_dict_names_unknown_keys_and_wrong_types():
  with pytest.raises(config_lib.ConfigError, match=r'config.stop.sgima is not a key'):
    config_lib.from_dict({'stop': {'sgima': 0.1}})
  assert config_lib.from_dict({'stop': {'sgima': 0.1}}, strict=False).stop.sigma == 0.25
  with pytest.raises(config_lib.ConfigError, match='config.stop=3 should be a group'):
    config_lib.from_dict({'stop': 3})
  with pytest.raises(config_lib.ConfigError, match='config.stop.mode=3'):
    config_lib.from_dict({'stop': {'mode': 3}})


def test_load_json_reads_a_run_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a run, export'):
    config_lib.load_json(str(tmp_path))
  c = config_lib.base_config()
  c.total_steps = 7
  (tmp_path / 'config.json').write_text(c.to_json())
  assert config_lib.load_json(str(tmp_path)).to_json() == c.to_json()


def test_parse_arg_casts_to_the_defaults_types_and_refuses_other_keys():
  args = config_lib.parse_arg('steps=7,fast=yes,name=x', steps=-1, fast=False, name='', lr=0.1)
  assert (args.steps, args.fast, args.name, args.lr) == (7, True, 'x', 0.1)
  assert config_lib.parse_arg(None, steps=-1).steps == -1
  with pytest.raises(config_lib.ConfigError, match="'colour=red' is not allowed"):
    config_lib.parse_arg('colour=red', steps=-1)
  with pytest.raises(config_lib.ConfigError, match="'steps' is not allowed"):
    config_lib.parse_arg('steps', steps=-1)


def test_find_config_file_by_path_or_by_name_next_to_the_package(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  found = config_lib.find_config_file('eval/knn.py')
  assert found.parts[-3:] == ('configs', 'eval', 'knn.py') and found.is_file()
  assert config_lib.find_config_file(str(found)) == found
  (tmp_path / 'mine.py').write_text('')
  assert config_lib.find_config_file('mine.py') == type(found)('mine.py')
  assert os.path.isfile(config_lib.find_config_file('tiny.py'))
