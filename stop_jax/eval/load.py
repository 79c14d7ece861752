"""The frozen encoder an evaluation reads, and the config it runs under.

`load_model(path)` accepts a pretraining run (its `config.json` and `checkpoints/`), an export
(`stop_jax.eval.export`) or a converted official checkpoint (`stop_jax.tools.convert`); the model
is rebuilt from the config saved there. `merge_configs` adds an eval config's `eval` group and
seed; `result_name` names the result file WORKDIR/eval/<name>.json.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from stop_jax import config as config_lib
from stop_jax.eval import converted, export
from stop_jax.runtime import checkpointing, fileio


@dataclasses.dataclass
class LoadedModel:
  """A frozen encoder's params and the config it was trained with."""

  config: ml_collections.ConfigDict
  params: dict
  step: int | None
  source: str  # checkpoint | export | converted
  path: str


def _encoder_params(params: dict, path: str) -> dict:
  """The encoder subtree of a converted param dict (the target encoder when there is one)."""
  if 'patch_embed' in params:
    return params
  for key in ('target_encoder', 'target_params', 'encoder'):
    if key in params and 'patch_embed' in params[key]:
      return params[key]
  raise ValueError(
    f'{path}: converted params have no encoder (top-level keys {sorted(params)}); expected '
    "encoder params or one of 'target_encoder', 'target_params', 'encoder'."
  )


def load_model(path: str, step: int | None = None) -> LoadedModel:
  """Loads the target encoder of a run, an export or a converted official checkpoint."""
  # A converted directory also has checkpoints/0, so it is recognised first by its marker.
  if fileio.exists(os.path.join(path, converted.CONVERSION_FILE)):
    return _load_converted(path, step)
  if fileio.isdir(os.path.join(path, 'checkpoints')):
    config = config_lib.load_json(path)
    step, tree = checkpointing.load_checkpoint(path, step)
    return LoadedModel(config, tree['target_params'], int(step), 'checkpoint', path)
  if export.is_export_dir(path):
    config, params = export.load_exported(path)
    saved_step = fileio.read_json(os.path.join(path, export.INFO_FILE)).get('step')
    if step is not None and step != saved_step:
      raise ValueError(f'--step={step}, but the export in {path} holds step {saved_step}.')
    return LoadedModel(config, params, saved_step, 'export', path)
  if not fileio.isdir(path):
    raise FileNotFoundError(f'--workdir={path} does not exist.')
  raise FileNotFoundError(
    f'{path} is neither a run (no checkpoints/), an export (no {export.INFO_FILE}) nor a '
    f'converted checkpoint (no {converted.CONVERSION_FILE}).'
  )


def _load_converted(path: str, step: int | None) -> LoadedModel:
  config, params = converted.load_converted(path)
  if step is not None:
    raise ValueError(f'--step={step} does not apply to the converted checkpoint in {path}.')
  return LoadedModel(config, _encoder_params(params, path), None, 'converted', path)


def merge_configs(
  run_config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """The run's config (model, data) with the eval config's `eval` group and seed."""
  config = run_config.copy_and_resolve_references()
  for key in eval_config.eval.keys():
    config.eval[key] = eval_config.eval[key]
  config.seed = eval_config.seed
  return config_lib.lock(config)


def result_name(config) -> str:
  """eval.name, or '<protocol>_<dataset>[_<label>]'."""
  e = config.eval
  if e.name:
    return e.name
  if e.source == 'tfds':
    data = e.dataset.replace('/', '_')
  elif e.source == 'folder':
    data = os.path.basename(os.path.normpath(e.data_dir))
  else:
    data = e.source
  return '_'.join([e.protocol, data] + ([e.label] if e.label != 'label' else []))


def model_identity(model: LoadedModel) -> dict:
  """Where the params came from (source, absolute path, step): part of a feature-cache key."""
  return {'source': model.source, 'path': fileio.resolve(model.path), 'step': model.step}
