"""config.checks against config.schema: validate checks every key, group by group in schema order.

A key added to a builder of schema.py needs a check in checks.py (or a place in FREE_KEYS below);
a check that reads a key the schema does not declare fails here too.
"""

import json

import ml_collections
import pytest

from stop_jax import config as config_lib

# Keys any value of their type is fine for (ml_collections already refuses another type): switches,
# names, splits and paths. seed: any int.
FREE_KEYS = {
  'seed',
  'eval.rerun_final',
  'model.scan_blocks',
  'data.train_split',
  'data.eval_split',
  'data.flip',
  'eval.probe',
  'eval.probe_random_init',
  'eval.name',
  'eval.dataset',
  'eval.data_dir',
  'eval.train_split',
  'eval.test_split',
  'eval.center_crop',
  'eval.cache_features',
  'eval.linear_flip',
  'finetune.init',  # checked when the fine-tuning run starts (finetune_loop.resolve_config)
  'finetune.random_init',
  'finetune.dataset',
  'finetune.train_split',
  'finetune.test_split',
  'finetune.flip',
  'checkpoint.allow_config_change',
}
# Numbers that validate does not check today (a bad value fails later, where it is used).
UNCHECKED_NUMBERS = {'eval.probe_max_examples'}


class _Recorder:
  """A read-only view of a ConfigDict that records the dotted name of every leaf key read."""

  def __init__(self, node: ml_collections.ConfigDict, reads: list[str], prefix: str = ''):
    self._node, self._reads, self._prefix = node, reads, prefix

  def __getattr__(self, key):
    if key.startswith('_'):
      raise AttributeError(key)
    return self[key]

  def __getitem__(self, key):
    name = self._prefix + key
    assert key in self._node, f'validate reads config.{name}, which base_config() does not declare'
    value = self._node[key]
    if isinstance(value, ml_collections.ConfigDict):
      return _Recorder(value, self._reads, name + '.')
    self._reads.append(name)
    return value


def _leaves(node: dict, prefix: str = '') -> list[str]:
  out = []
  for key, value in node.items():
    if isinstance(value, dict):
      out += _leaves(value, prefix + key + '.')
    else:
      out.append(prefix + key)
  return out


def _schema_keys() -> list[str]:
  """Every leaf key of base_config(), in declaration order (ConfigDict.items() sorts them)."""
  return _leaves(json.loads(config_lib.base_config().to_json()))


def _reads(**values) -> list[str]:
  """The keys validate reads, first reads in order, on base_config() updated with values."""
  c = config_lib.base_config()
  c.update_from_flattened_dict(values)
  reads = []
  config_lib.validate(_Recorder(c, reads), num_devices=8)
  return list(dict.fromkeys(reads))


def _group(key: str) -> str:
  """The schema group of a key: its top-level name (a run-control key is its own group)."""
  return key.split('.')[0]


def test_validate_checks_every_key_of_the_schema_and_no_other():
  schema = _schema_keys()
  # data.data_dir is read when source=folder (the default tfds needs none).
  read = set(_reads()) | set(_reads(**{'data.source': 'folder', 'data.data_dir': '/x'}))
  assert not (FREE_KEYS | UNCHECKED_NUMBERS) - set(schema), 'FREE_KEYS names unknown keys'
  missing = [k for k in schema if k not in read and k not in FREE_KEYS | UNCHECKED_NUMBERS]
  assert not missing, f'keys of base_config() that validate never checks: {missing}'
  assert not read & FREE_KEYS, 'a checked key is listed in FREE_KEYS'


def test_validate_checks_the_groups_in_schema_order():
  schema_groups = list(dict.fromkeys(_group(k) for k in _schema_keys()))
  read_groups = list(dict.fromkeys(_group(k) for k in _reads()))
  assert read_groups == [g for g in schema_groups if g in read_groups]
  assert read_groups[0] == 'model' and read_groups[-1] == 'mesh'  # mesh: with num_devices


def test_the_recorder_sees_an_unknown_key():
  c = config_lib.base_config()
  with pytest.raises(AssertionError, match='stop.sgima'):
    _ = _Recorder(c, []).stop.sgima


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('predictor.width', 100, r'predictor.width=100 .* divisible by its num_heads=12'),
    ('data.digits_upscale', 'nearest', r"data.digits_upscale='nearest' .* one of \('bilinear'"),
    ('eval.feature_types', ('last', 'last'), 'eval.feature_types'),
    ('checkpoint.keep', 0, r'checkpoint.keep=0 .* >= 1'),
    ('total_steps', 0, r'total_steps=0 .* -1 or > 0'),
  ],
)
def test_each_group_check_names_its_key(key, value, match):
  c = config_lib.base_config()
  c.update_from_flattened_dict({key: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)
