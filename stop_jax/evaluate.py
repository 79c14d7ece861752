r"""Evaluates a frozen target encoder with the protocols of the StoP paper.

  python -m stop_jax.evaluate --config=configs/eval/in1k_1pct.py --workdir=WORKDIR [--step=N]

WORKDIR is a pretraining run (its `config.json` and `checkpoints/`; the latest checkpoint unless
--step), a directory written by `stop_jax.eval.export`, or one written by `stop_jax.tools.convert`
(official PyTorch weights). The model is rebuilt from the config saved there; the eval config
(configs/eval/*.py) only contributes its `eval` group and seed.

Protocols (`eval.protocol`):
- logreg: StoP's IN-1k 1% protocol, L2-regularised multinomial logistic regression (L-BFGS) on
  standardised frozen features, l2 chosen on a held-out fifth of the train split (`probe.py`).
- linear: the full linear probe of VISSL on augmented images (`linear_eval.py`).
- knn: weighted k-NN on cosine similarity (`knn.py`).

Every protocol runs on both feature types of `features.py` (avg-pooled last layer, and the
concatenation of the avg-pooled last 4 layers). Results go to WORKDIR/eval/<name>.json and one
summary line is printed. Features of logreg/knn are cached in WORKDIR/eval/cache, so a second
evaluation of the same checkpoint on the same data (e.g. another l2 grid) skips the encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.data import labelled as eval_input
from stop_jax.eval import export, features, knn, linear, logreg
from stop_jax.runtime import checkpointing

CACHE_VERSION = 1  # Bump when the feature computation changes, so old cache files are ignored.


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
  if os.path.exists(os.path.join(path, 'conversion.json')):  # convert.CONVERSION_FILE
    return _load_converted(path, step)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    config = config_lib.load_json(path)
    step, tree = checkpointing.load_checkpoint(path, step)
    return LoadedModel(config, tree['target_params'], int(step), 'checkpoint', path)
  if export.is_export_dir(path):
    config, params = export.load_exported(path)
    with open(os.path.join(path, export.INFO_FILE)) as f:
      saved_step = json.load(f).get('step')
    if step is not None and step != saved_step:
      raise ValueError(f'--step={step}, but the export in {path} holds step {saved_step}.')
    return LoadedModel(config, params, saved_step, 'export', path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--workdir={path} does not exist.')
  raise FileNotFoundError(
    f'{path} is neither a run (no checkpoints/), an export (no {export.INFO_FILE}) nor a '
    'converted checkpoint (no conversion.json).'
  )


def _load_converted(path: str, step: int | None) -> LoadedModel:
  try:
    from stop_jax.tools import convert  # noqa: PLC0415 (optional: needs the converter's extras)
  except ImportError as e:
    raise FileNotFoundError(f'converted checkpoints cannot be read here ({e}).') from None
  config, params = convert.load_converted(path)
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


def _cached_split_features(config, encoder, model: LoadedModel, spec, feature_types, fingerprint):
  e = config.eval
  cache_dir = os.path.join(model.path, 'eval', 'cache') if e.cache_features else None
  key = {
    'version': CACHE_VERSION,
    'model': {
      'source': model.source,
      'path': os.path.abspath(model.path),
      'step': model.step,
      'params': fingerprint,
    },
    'model_config': config.model.to_dict(),
    'data': dataclasses.asdict(spec),
  }

  def compute(types):
    extractor = features.FeatureExtractor(encoder, model.params, e.batch_size, types)
    t0 = time.perf_counter()
    feats, labels = features.extract_from_batches(
      extractor, eval_input.eval_batches(spec, extractor.global_batch)
    )
    logging.info(
      'features %s of %s: %d images in %.1fs',
      types,
      spec.split,
      len(labels),
      time.perf_counter() - t0,
    )
    return feats, labels

  return features.cached_features(cache_dir, key, feature_types, compute)


def _feature_protocol(config, encoder, model, train_spec, test_spec, feature_types) -> dict:
  """logreg / knn on (cached) features of both splits; {feature_type: result}."""
  e = config.eval
  fingerprint = features.params_fingerprint(model.params) if e.cache_features else None
  train_f, train_y = _cached_split_features(
    config, encoder, model, train_spec, feature_types, fingerprint
  )
  test_f, test_y = _cached_split_features(
    config, encoder, model, test_spec, feature_types, fingerprint
  )
  num_classes = eval_input.num_classes(train_spec)
  results = {}
  for t in feature_types:
    if e.protocol == 'logreg':
      res = logreg.linear_probe(
        train_f[t], train_y, test_f[t], test_y, num_classes, tuple(e.probe_l2), seed=config.seed
      )
      res['top1'] = res['accuracy']
    else:
      res = knn.knn_accuracy(
        train_f[t], train_y, test_f[t], test_y, num_classes, e.knn_k, e.knn_temperature
      )
    results[t] = res
  return results


def evaluate(eval_config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """Runs eval_config's protocol on WORKDIR's encoder; writes and returns the result record."""
  config_lib.validate(eval_config)
  t0 = time.perf_counter()
  model = load_model(workdir, step)
  config = merge_configs(model.config, eval_config)
  config_lib.validate(config)
  e = config.eval
  encoder = models.build_encoder(config)
  feature_types = features.check_feature_types(e.feature_types, encoder.depth)
  size = e.image_size if e.image_size > 0 else config.model.image_size
  if size % config.model.patch_size:
    raise config_lib.ConfigError(
      f'config.eval.image_size={size} is not allowed: a multiple of the model patch size '
      f'{config.model.patch_size}.'
    )
  train_spec = eval_input.from_eval_config(config, 'train', size)
  test_spec = eval_input.from_eval_config(config, 'test', size)

  if e.protocol == 'linear':
    res = linear.linear_eval(config, encoder, model.params, train_spec, test_spec)
    results = {t: res[t] for t in feature_types}
    extra = {k: v for k, v in res.items() if k not in feature_types}
  else:
    results = _feature_protocol(config, encoder, model, train_spec, test_spec, feature_types)
    extra = {}
  best = max(feature_types, key=lambda t: results[t]['top1'])
  name = result_name(config)
  record = {
    'name': name,
    'protocol': e.protocol,
    'model': {
      'source': model.source,
      'path': os.path.abspath(model.path),
      'step': model.step,
      'variant': config.model.variant,
      'width': encoder.width,
      'depth': encoder.depth,
      'patch_size': config.model.patch_size,
      'num_params': int(sum(np.size(x) for x in jax.tree.leaves(model.params))),
    },
    'data': {'train': dataclasses.asdict(train_spec), 'test': dataclasses.asdict(test_spec)},
    'results': results,
    'best': {'feature_type': best, 'top1': results[best]['top1']},
    **extra,
    'eval_config': e.to_dict(),
    'seconds': time.perf_counter() - t0,
  }
  path = os.path.join(workdir, 'eval', f'{name}.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(record, f, indent=2, default=_json_default)
    print(summary_line(record, path), flush=True)
  return record


def summary_line(record: dict, path: str) -> str:
  """e.g. `logreg_digits (checkpoint step 660): last 93.06% | last4 94.17% -> best last4`."""
  scores = ' | '.join(f'{t} {100 * r["top1"]:.2f}%' for t, r in record['results'].items())
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.step)


def _define_flags():
  # Only when run as a program: importing this module must not claim flag names.
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file('config', None, 'An eval config (configs/eval/*.py[:arg]).')
  flags.DEFINE_string('workdir', None, 'A run directory, an export, or a converted checkpoint.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)
