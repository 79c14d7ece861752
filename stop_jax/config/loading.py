"""Config from saved values, from a config file, and a config file's own argument.

`from_dict` / `load_json` rebuild a run's locked config from its config.json; `load_config_file`
runs a file of `configs/` as `--config=configs/NAME[:ARG]` does; `parse_arg` parses that ARG.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections
from absl import logging

from stop_jax.config.checks import ConfigError
from stop_jax.config.schema import base_config, lock
from stop_jax.runtime import fileio


def from_dict(values: dict, strict: bool = True) -> ml_collections.ConfigDict:
  """A locked config: `base_config()` updated with saved values (e.g. a run's config.json).

  JSON has no tuples, so a list becomes a tuple where the base value is one. A key that
  base_config() does not declare is a ConfigError when strict, else skipped with a warning (a
  run saved by an older version stays loadable); keys the values lack keep their defaults.

  Raises:
    ConfigError naming the key that is unknown (strict) or whose value has the wrong type.
  """
  config = base_config()

  def update(node: ml_collections.ConfigDict, saved: dict, prefix: str):
    for key, value in saved.items():
      name = prefix + key
      if key not in node:
        if strict:
          raise ConfigError(
            f'config.{name} is not a key of base_config(): was it saved by another version?'
          )
        logging.warning('saved config key %s is unknown here; ignored.', name)
        continue
      if isinstance(node[key], ml_collections.ConfigDict):
        if not isinstance(value, dict):
          raise ConfigError(f'config.{name}={value!r} should be a group of keys.')
        update(node[key], value, name + '.')
        continue
      if isinstance(node[key], tuple) and isinstance(value, list):
        value = tuple(value)
      try:
        node[key] = value
      except TypeError as e:
        raise ConfigError(f'config.{name}={value!r}: {e}') from e

  update(config, values, '')
  return lock(config)


def load_json(directory: str, strict: bool = False) -> ml_collections.ConfigDict:
  """The locked config saved as `<directory>/config.json` by a run, an export or a conversion."""
  path = os.path.join(directory, 'config.json')
  try:
    saved = fileio.read_json(path)  # local or an object store (gs://...)
  except FileNotFoundError:
    raise FileNotFoundError(
      f'{path} not found: {directory!r} is not a run, export or converted-checkpoint directory.'
    ) from None
  return from_dict(saved, strict=strict)


def parse_arg(arg: str | None, **defaults):
  """Parses a config-file argument `a=1,b=x` (from `--config=file.py:a=1,b=x`).

  Only the keys given in `defaults` are allowed; values are cast to the default's type.
  """
  result = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ConfigError(
        f'config argument {item!r} is not allowed: expected key=value with key in {sorted(defaults)}.'
      )
    kind = type(defaults[key])
    result[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
  return ml_collections.ConfigDict(result)


def find_config_file(name: str) -> pathlib.Path:
  """A config file by path, or by name under the repository's `configs/` ('tiny.py',
  'eval/knn.py').

  The folder is looked for next to the package (editable install), in the working directory and
  in its parent (a notebook run from `notebooks/`).
  """
  path = pathlib.Path(name)
  if path.is_file():
    return path
  # parents[2]: the repository root above stop_jax/config/.
  roots = [pathlib.Path(__file__).resolve().parents[2], pathlib.Path.cwd()]
  roots.append(pathlib.Path.cwd().parent)
  for root in roots:
    candidate = root / 'configs' / name
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
    f'config file {name!r} not found as a path nor in {[str(r / "configs") for r in roots]}: '
    'run from a clone of the stop_jax repository.'
  )


def load_config_file(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of a file, as `--config=configs/NAME[:ARG]` gives it: `get_config(arg)`, or
  `get_config()` without an arg (the recipes take none)."""
  path = find_config_file(name)
  spec = importlib.util.spec_from_file_location(f'stop_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
