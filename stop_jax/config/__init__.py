"""The config: its schema (every key, declared once), its checks, and loading config files.

Call sites use this package's names (`config_lib.base_config()`, `config_lib.validate(c)`,
`config_lib.load_config_file('tiny.py')`); each is defined in exactly one submodule:
  schema   base_config (every key, one builder per group), lock, vit_shape, the allowed values
  checks   validate (one check per group, in the schema's order), ConfigError
  loading  from_dict, load_json (a saved config.json), load_config_file, parse_arg
"""

from stop_jax.config.checks import ConfigError, validate
from stop_jax.config.loading import (
  find_config_file,
  from_dict,
  load_config_file,
  load_json,
  parse_arg,
)
from stop_jax.config.schema import (
  DATA_SOURCES,
  EVAL_LABELS,
  EVAL_PROTOCOLS,
  EVAL_SOURCES,
  FEATURE_TYPES,
  FINETUNE_SOURCES,
  GRAD_CLIP_SCOPES,
  HEAD_NORMS,
  INTERPOLATIONS,
  LOWRES_TARGETS,
  MASK_MODES,
  MULTI_LAYER_TARGETS,
  SHAPES_LABELS,
  STOP_MODES,
  VIT_VARIANTS,
  base_config,
  lock,
  vit_shape,
)

__all__ = [
  'DATA_SOURCES',
  'EVAL_LABELS',
  'EVAL_PROTOCOLS',
  'EVAL_SOURCES',
  'FEATURE_TYPES',
  'FINETUNE_SOURCES',
  'GRAD_CLIP_SCOPES',
  'HEAD_NORMS',
  'INTERPOLATIONS',
  'LOWRES_TARGETS',
  'MASK_MODES',
  'MULTI_LAYER_TARGETS',
  'SHAPES_LABELS',
  'STOP_MODES',
  'VIT_VARIANTS',
  'ConfigError',
  'base_config',
  'find_config_file',
  'from_dict',
  'load_config_file',
  'load_json',
  'lock',
  'parse_arg',
  'validate',
  'vit_shape',
]
