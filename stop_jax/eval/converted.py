"""The directory format of an imported official checkpoint: written by the converter, read here.

`python -m stop_jax.tools.convert --output=DIR` writes DIR/`config.json` (the resolved config),
DIR/`conversion.json` (source file, parts) and an orbax checkpoint laid out as a training run's
(`checkpoints/0` with `params` = {'encoder', 'predictor'} and `target_params`), so
`load_converted(DIR)` and `checkpointing.load_checkpoint(DIR)` both read it. There is no
optimiser state: the result is for evaluation and inspection, not for resuming training.

The format lives here, below `tools`, because evaluation reads converted checkpoints; reading
one needs neither torch nor the converter.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from stop_jax import config as config_lib
from stop_jax.runtime import checkpointing, fileio

# Marks a directory written by `write_converted` (beside config.json and checkpoints/0).
CONVERSION_FILE = 'conversion.json'


def write_converted(output: str, config: ml_collections.ConfigDict, params: dict, info: dict):
  """Writes DIR/config.json, DIR/conversion.json and DIR/checkpoints/0 (see module docstring).

  Args:
    output: the new directory DIR (refused if it already holds config.json or checkpoints); a
      local path or an object store (gs://...).
    config: the config describing the converted model.
    params: a non-empty subset of {'encoder', 'predictor', 'target_encoder'}: param trees.
    info: what conversion.json records besides the parts (source file, checkpoint values).
  """
  for name in ('config.json', 'checkpoints'):
    if fileio.exists(os.path.join(output, name)):
      raise FileExistsError(f'--output={output} already holds {name}: choose a new directory.')
  fileio.makedirs(output)
  tree: dict[str, Any] = {'step': np.asarray(0, np.int32)}
  model = {p: params[p] for p in ('encoder', 'predictor') if p in params}
  if model:
    tree['params'] = model
  if 'target_encoder' in params:
    tree['target_params'] = params['target_encoder']
  # The layout of a training run's checkpoints (checkpointing.STATE / META items), so every
  # tool that reads runs reads converted weights too.
  manager = ocp.CheckpointManager(
    fileio.resolve(os.path.join(output, 'checkpoints')),
    item_names=(checkpointing.STATE, checkpointing.META),
    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
  )
  manager.save(
    0,
    args=ocp.args.Composite(
      **{
        checkpointing.STATE: ocp.args.StandardSave(tree),
        checkpointing.META: ocp.args.JsonSave({'step': 0, 'converted_from': info}),
      }
    ),
    force=True,
  )
  manager.wait_until_finished()
  manager.close()
  fileio.write_text(os.path.join(output, 'config.json'), config.to_json_best_effort(indent=2))
  fileio.write_json(
    os.path.join(output, CONVERSION_FILE), {**info, 'parts': sorted(params)}, indent=2
  )


def load_converted(directory: str) -> tuple[ml_collections.ConfigDict, dict[str, dict]]:
  """Reads what `python -m stop_jax.tools.convert --output=DIR` wrote.

  Returns:
    (config, params) with params a subset of {'encoder', 'predictor', 'target_encoder'}: host
    param trees for `apply({'params': tree}, ...)` of the models built from config.
  """
  config = config_lib.load_json(directory)
  _, tree = checkpointing.load_checkpoint(directory)
  params = dict(tree.get('params', {}))
  if 'target_params' in tree:
    params['target_encoder'] = tree['target_params']
  return config, params
