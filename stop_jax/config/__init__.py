"""The config: its schema (every key, declared once), its checks, and loading config files.

Call sites use this package's names (`config_lib.base_config()`, `config_lib.validate(c)`,
`config_lib.load_config_file('tiny.py')`); each is defined in exactly one submodule.
"""

from stop_jax.config.base import (
  DATA_SOURCES,
  EVAL_LABELS,
  EVAL_SOURCES,
  FEATURE_TYPES,
  VIT_VARIANTS,
  ConfigError,
  base_config,
  from_dict,
  load_config_file,
  load_json,
  lock,
  parse_arg,
  validate,
  vit_shape,
)

__all__ = [
  'DATA_SOURCES',
  'EVAL_LABELS',
  'EVAL_SOURCES',
  'FEATURE_TYPES',
  'VIT_VARIANTS',
  'ConfigError',
  'base_config',
  'from_dict',
  'load_config_file',
  'load_json',
  'lock',
  'parse_arg',
  'validate',
  'vit_shape',
]
