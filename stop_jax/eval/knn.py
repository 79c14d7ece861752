"""Weighted k-NN classification on frozen features: a fast sanity metric (DINO's protocol).

Each test feature votes with its k most cosine-similar train features; neighbour j adds
`exp(sim_j / T)` to its class. No training, so it runs in seconds during pretraining
(`eval.knn_every_steps`) and tracks linear-probe accuracy closely enough to spot a collapse or a
broken run early.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from stop_jax.data import labelled
from stop_jax.eval import features

_TEST_CHUNK = 256  # Test rows per jitted call: bounds the [chunk, N_train] similarity matrix.


def _l2_normalise(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def knn_scores(
  train_x: jax.Array,
  train_y: jax.Array,
  test_x: jax.Array,
  num_classes: int,
  k: int,
  temperature: float,
) -> jax.Array:
  """Class scores of a weighted k-NN vote on cosine similarity (pure).

  Args:
    train_x: [N, D] features (normalised here).
    train_y: int [N] labels in [0, num_classes).
    test_x: [M, D] features.
    num_classes: C.
    k: neighbours, 1 <= k <= N.
    temperature: T > 0 of the vote weights exp(sim / T).

  Returns:
    float32 [M, C]: sum over the k nearest train rows of exp(sim / T) per class.
  """
  sim = jnp.dot(
    _l2_normalise(test_x.astype(jnp.float32)),
    _l2_normalise(train_x.astype(jnp.float32)).T,
    precision=jax.lax.Precision.HIGHEST,
  )  # [M, N]
  top_sim, top_idx = jax.lax.top_k(sim, k)  # [M, k]
  weights = jnp.exp(top_sim / temperature)  # [M, k]
  votes = jax.nn.one_hot(train_y[top_idx], num_classes, dtype=jnp.float32)  # [M, k, C]
  return jnp.einsum('mk,mkc->mc', weights, votes)


def knn_classify(
  train_x,
  train_y,
  test_x,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
) -> np.ndarray:
  """Class scores [M, C] for every test row, computed in fixed-size test chunks (one compile).

  Args: as `knn_scores`; numpy or jax arrays. k larger than N is an error.
  """
  train_x = jnp.asarray(train_x, jnp.float32)  # [N, D]
  train_y = jnp.asarray(train_y, jnp.int32)  # [N]
  test_x = np.asarray(test_x, np.float32)  # [M, D]
  n = train_x.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f'k={k} is not allowed: 1 <= k <= {n} (the number of train features).')
  if temperature <= 0:
    raise ValueError(f'temperature={temperature} must be > 0.')
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f'train dim {train_x.shape[1]} != test dim {test_x.shape[1]}.')
  m = len(test_x)
  chunk = min(_TEST_CHUNK, max(m, 1))
  padded = np.zeros((math.ceil(m / chunk) * chunk, test_x.shape[1]), np.float32)
  padded[:m] = test_x
  out = [
    np.asarray(knn_scores(train_x, train_y, padded[i : i + chunk], num_classes, k, temperature))
    for i in range(0, len(padded), chunk)
  ]
  return np.concatenate(out)[:m] if out else np.zeros((0, num_classes), np.float32)


def knn_accuracy(
  train_x, train_y, test_x, test_y, num_classes: int, k: int = 20, temperature: float = 0.07
) -> dict:
  """Top-1 / top-5 accuracy (in [0, 1]) of the weighted k-NN classifier."""
  scores = knn_classify(train_x, train_y, test_x, num_classes, k, temperature)  # [M, C]
  test_y = np.asarray(test_y)
  order = np.argsort(-scores, axis=1, kind='stable')
  top5 = min(5, num_classes)
  return {
    'top1': float(np.mean(order[:, 0] == test_y)),
    'top5': float(np.mean(np.any(order[:, :top5] == test_y[:, None], axis=1))),
    'k': int(k),
    'temperature': float(temperature),
    'num_train': int(len(train_y)),
    'num_test': int(len(test_y)),
  }


def knn_eval(config, encoder, params) -> dict:
  """k-NN accuracy of `encoder` on the run's own data, for periodic use during pretraining.

  Un-augmented images of config.data's train and eval splits (at most eval.knn_max_examples
  each), the average-pooled last-layer feature, eval.knn_k neighbours, eval.knn_temperature.

  Returns:
    {'knn_top1': ..., 'knn_top5': ...} in [0, 1], plus the counts.
  """
  e = config.eval
  extractor = features.FeatureExtractor(encoder, params, e.batch_size, ('last',))
  data, specs = {}, {}
  for role in ('train', 'test'):
    specs[role] = labelled.from_run_config(config, role, e.knn_max_examples)
    batches = labelled.eval_batches(specs[role], extractor.global_batch)
    feats, labels = features.extract_from_batches(extractor, batches)
    data[role] = (feats['last'], labels)
  num_classes = labelled.num_classes(specs['train'])  # the classes the neighbours vote for
  res = knn_accuracy(*data['train'], *data['test'], num_classes, e.knn_k, e.knn_temperature)
  logging.info('k-NN (k=%d, T=%g): top-1 %.2f%%', res['k'], e.knn_temperature, 100 * res['top1'])
  return {f'knn_{k}': v for k, v in res.items()}
