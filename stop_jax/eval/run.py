"""One evaluation of a frozen encoder, as `python -m stop_jax.evaluate` runs it.

`evaluate(eval_config, workdir, step)` loads the encoder (`load.load_model`), runs the protocol
`eval.protocol` (`evaluators.PROTOCOLS`) on every feature type, writes WORKDIR/eval/<name>.json
and prints one summary line. Features of logreg/knn are cached in WORKDIR/eval/cache, so a
second evaluation of the same checkpoint on the same data (e.g. another l2 grid) skips the
encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.data import labelled
from stop_jax.eval import evaluators, features, load
from stop_jax.runtime import fileio


def make_task(config: ml_collections.ConfigDict, model: load.LoadedModel, depth: int):
  """The protocol's task: both splits at the eval image size, feature types, feature cache."""
  e = config.eval
  feature_types = features.check_feature_types(e.feature_types, depth)
  size = e.image_size if e.image_size > 0 else config.model.image_size
  if size % config.model.patch_size:
    raise config_lib.ConfigError(
      f'config.eval.image_size={size} is not allowed: a multiple of the model patch size '
      f'{config.model.patch_size}.'
    )
  train_spec = labelled.from_eval_config(config, 'train', size)
  test_spec = labelled.from_eval_config(config, 'test', size)
  cache_dir = os.path.join(model.path, 'eval', 'cache') if e.cache_features else None
  return evaluators.EvalTask(
    config, train_spec, test_spec, feature_types, cache_dir, load.model_identity(model)
  )


def evaluate(eval_config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """Runs eval_config's protocol on WORKDIR's encoder; writes and returns the result record."""
  config_lib.validate(eval_config)
  t0 = time.perf_counter()
  model = load.load_model(workdir, step)
  config = load.merge_configs(model.config, eval_config)
  config_lib.validate(config)
  e = config.eval
  encoder = models.build_encoder(config)
  task = make_task(config, model, encoder.depth)
  results, extra = evaluators.PROTOCOLS[e.protocol](task, encoder, model.params)
  score = score_key(e.protocol)
  best = max(task.feature_types, key=lambda t: results[t][score])
  name = load.result_name(config)
  record = {
    'name': name,
    'protocol': e.protocol,
    'model': {
      'source': model.source,
      'path': fileio.resolve(model.path),
      'step': model.step,
      'variant': config.model.variant,
      'width': encoder.width,
      'depth': encoder.depth,
      'patch_size': config.model.patch_size,
      'num_params': int(sum(np.size(x) for x in jax.tree.leaves(model.params))),
    },
    'data': {'train': dataclasses.asdict(task.train), 'test': dataclasses.asdict(task.test)},
    'results': results,
    'best': {'feature_type': best, score: results[best][score]},
    **extra,
    'eval_config': e.to_dict(),
    'seconds': time.perf_counter() - t0,
  }
  path = os.path.join(workdir, 'eval', f'{name}.json')
  if jax.process_index() == 0:
    fileio.write_text(path, json.dumps(record, indent=2, default=_json_default))
    print(summary_line(record, path), flush=True)
  return record


def score_key(protocol: str) -> str:
  """The result that ranks the feature types: top-1 accuracy, or davis's J&F-Mean."""
  return 'J&F-Mean' if protocol == 'davis' else 'top1'


def summary_line(record: dict, path: str) -> str:
  """e.g. `tiny_logreg (checkpoint step 660): last XX.XX% | last4 YY.YY% -> best last4 [PATH]`."""
  key = score_key(record.get('protocol', ''))
  label = '' if key == 'top1' else f'{key} '
  scores = ' | '.join(f'{t} {label}{100 * r[key]:.2f}%' for t, r in record['results'].items())
  m = record['model']
  step = f' step {m["step"]}' if m['step'] is not None else ''
  return (
    f'{record["name"]} ({m["source"]}{step}): {scores} -> best {record["best"]["feature_type"]}'
    f' [{path}]'
  )


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
