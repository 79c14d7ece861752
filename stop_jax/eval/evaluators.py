"""Evaluators: what the pretraining loop and `python -m stop_jax.evaluate` run on a frozen encoder.

During pretraining (`for_training`), an evaluator is an object with a `name`, a period and a
call `(encoder, params) -> {group: metrics}`:

- `KnnEvaluator` ('knn'): the periodic k-NN sanity metric on the run's own data
  (`eval.knn_every_steps`), one group ''.
- `health.HealthEvaluator` ('health'): RankMe and feature spread of a fixed held-out batch, a
  periodic collapse check (`eval.health_every_steps`), one group ''.
- `ProbeEvaluator` ('probe'): the final linear probe (logistic regression on the avg-pooled last
  layer, `logreg.linear_probe`), groups 'pretrained' and, with `eval.probe_random_init`,
  'random_init' (the same probe on a randomly initialised encoder, as a reference).

The loop logs every group under the prefix `name` (group '') or `name_group`, and puts the
results of the end-of-run evaluators (every_steps == 0) into summary.json under `name`.

For `python -m stop_jax.evaluate`, `PROTOCOLS` maps `eval.protocol` to the runner of that
protocol: `(task, encoder, params) -> (results per feature type, extra record fields)`.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from stop_jax.data import labelled, probe_arrays
from stop_jax.eval import davis, features, health, knn, linear, logreg


class Evaluator(typing.Protocol):
  """Something the pretraining loop runs on the target encoder."""

  name: str  # summary key and metric prefix: 'knn', 'probe', ...
  every_steps: int  # during pretraining: run every N steps (> 0), or once at the end (0)

  def __call__(self, encoder: nn.Module, params) -> dict[str, dict[str, float]]:
    """{group: flat metrics}; group '' when the evaluator has a single result."""
    ...


@dataclasses.dataclass(frozen=True)
class KnnEvaluator:
  """k-NN accuracy on the run's own data (`knn.knn_eval`): a cheap periodic sanity metric."""

  config: ml_collections.ConfigDict
  every_steps: int
  name: str = 'knn'

  def __call__(self, encoder: nn.Module, params) -> dict[str, dict[str, float]]:
    return {'': knn.knn_eval(self.config, encoder, params)}


@dataclasses.dataclass(frozen=True)
class ProbeEvaluator:
  """The final linear probe of the target encoder, next to the same probe on a random-init one.

  rng is the random-init encoder's init key.
  """

  config: ml_collections.ConfigDict
  rng: jax.Array
  every_steps: int = 0
  name: str = 'probe'

  def __call__(self, encoder: nn.Module, params) -> dict[str, dict]:
    e = self.config.eval
    train_x, train_y = probe_arrays.load_eval_arrays(self.config, 'train', e.probe_max_examples)
    test_x, test_y = probe_arrays.load_eval_arrays(self.config, 'test', e.probe_max_examples)
    num_classes = int(max(train_y.max(), test_y.max()) + 1)
    candidates = [('pretrained', params)]
    if e.probe_random_init:
      size = self.config.model.image_size
      random_params = nn.unbox(encoder.init(self.rng, jnp.zeros((1, size, size, 3)))['params'])
      candidates.append(('random_init', random_params))
    results = {}
    for name, candidate in candidates:
      res = logreg.linear_probe(
        features.encoder_features(encoder, candidate, train_x),
        train_y,
        features.encoder_features(encoder, candidate, test_x),
        test_y,
        num_classes=num_classes,
        l2_grid=tuple(e.probe_l2),
      )
      results[name] = res
      logging.info(
        'linear probe (%s encoder, avg-pooled last layer): test accuracy %.2f%% '
        '(l2 %g, %d train / %d test)',
        name,
        100 * res['accuracy'],
        res['l2'],
        res['num_train'],
        res['num_test'],
      )
    return results


def for_training(config: ml_collections.ConfigDict, rng: jax.Array) -> list[Evaluator]:
  """The evaluators a pretraining run uses, from config.eval.

  The periodic k-NN when eval.knn_every_steps > 0, the collapse health (`health.py`) every
  eval.health_every_steps (-1: every log step), and the final linear probe when eval.probe
  (with its random-init baseline when eval.probe_random_init); rng is the probe's init key.
  """
  e = config.eval
  evaluators: list[Evaluator] = []
  if e.knn_every_steps:
    evaluators.append(KnnEvaluator(config, every_steps=e.knn_every_steps))
  every = config.log_every_steps if e.health_every_steps == -1 else e.health_every_steps
  if every > 0:
    evaluators.append(health.HealthEvaluator(config, every_steps=every))
  if e.probe:
    evaluators.append(ProbeEvaluator(config, rng))
  return evaluators


# ---------------------------------------------------------------------------------------------
# The protocols of `python -m stop_jax.evaluate`.


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """What a protocol runner gets besides the encoder and its params: the merged config (model +
  eval group), both splits, the feature types, and where features are cached.

  cache_dir: the feature cache (logreg, knn); None disables it. model: where the params came
  from ({'source', 'path', 'step'}), part of the cache key next to a hash of the params.
  """

  config: ml_collections.ConfigDict
  train: labelled.EvalData
  test: labelled.EvalData
  feature_types: tuple[str, ...]
  cache_dir: str | None = None
  model: dict | None = None


# (results: {feature_type: metrics}, extra: fields added to the result record).
ProtocolResult = tuple[dict[str, dict], dict]
ProtocolRunner = Callable[[EvalTask, nn.Module, typing.Any], ProtocolResult]


def split_features(
  task: EvalTask,
  encoder: nn.Module,
  params,
  spec: labelled.EvalData,
  fingerprint: str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """({feature_type: float32 [N, dim]}, int32 labels [N]) of one split, through the cache.

  fingerprint: `features.params_fingerprint(params)` (None without a cache).
  """
  e = task.config.eval
  key = {
    'version': features.CACHE_VERSION,
    'model': {**(task.model or {}), 'params': fingerprint},
    'model_config': task.config.model.to_dict(),
    'data': dataclasses.asdict(spec),
  }

  def compute(types):
    extractor = features.FeatureExtractor(encoder, params, e.batch_size, types)
    t0 = time.perf_counter()
    feats, labels = features.extract_from_batches(
      extractor, labelled.eval_batches(spec, extractor.global_batch)
    )
    logging.info(
      'features %s of %s: %d images in %.1fs',
      types,
      spec.split,
      len(labels),
      time.perf_counter() - t0,
    )
    return feats, labels

  return features.cached_features(task.cache_dir, key, task.feature_types, compute)


def _on_features(task: EvalTask, encoder, params, classify) -> ProtocolResult:
  """classify(train_x, train_y, test_x, test_y, num_classes) on each feature type of both splits."""
  fingerprint = features.params_fingerprint(params) if task.cache_dir else None
  train_f, train_y = split_features(task, encoder, params, task.train, fingerprint)
  test_f, test_y = split_features(task, encoder, params, task.test, fingerprint)
  num_classes = labelled.num_classes(task.train)
  results = {
    t: classify(train_f[t], train_y, test_f[t], test_y, num_classes) for t in task.feature_types
  }
  return results, {}


def run_logreg(task: EvalTask, encoder: nn.Module, params) -> ProtocolResult:
  """StoP's 1% protocol: logistic regression on standardised frozen features (`logreg`)."""
  e = task.config.eval

  def classify(train_x, train_y, test_x, test_y, num_classes):
    res = logreg.linear_probe(
      train_x, train_y, test_x, test_y, num_classes, tuple(e.probe_l2), seed=task.config.seed
    )
    res['top1'] = res['accuracy']
    return res

  return _on_features(task, encoder, params, classify)


def run_knn(task: EvalTask, encoder: nn.Module, params) -> ProtocolResult:
  """Weighted k-NN on cosine similarity of frozen features (`knn`)."""
  e = task.config.eval

  def classify(train_x, train_y, test_x, test_y, num_classes):
    return knn.knn_accuracy(
      train_x, train_y, test_x, test_y, num_classes, e.knn_k, e.knn_temperature
    )

  return _on_features(task, encoder, params, classify)


def run_linear(task: EvalTask, encoder: nn.Module, params) -> ProtocolResult:
  """The full linear probe on augmented images (`linear`); its heads etc. go to the record."""
  res = linear.linear_eval(task.config, encoder, params, task.train, task.test, task.feature_types)
  results = {t: res[t] for t in task.feature_types}
  return results, {k: v for k, v in res.items() if k not in task.feature_types}


PROTOCOLS: dict[str, ProtocolRunner] = {
  'logreg': run_logreg,
  'linear': run_linear,
  'knn': run_knn,
  'davis': davis.run_davis,  # DAVIS 2017 label propagation; scores J&F, not top1 (davis.py)
}
