"""Weighted k-NN: against a brute-force numpy reference, on separable data, and knn_eval."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.eval import knn


def _reference_scores(train_x, train_y, test_x, num_classes, k, temperature):
  """One test row at a time, straight from the definition."""
  tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  out = np.zeros((len(test_x), num_classes))
  for i, q in enumerate(test_x):
    sim = tr @ (q / np.linalg.norm(q))  # [N]
    nearest = np.argsort(-sim, kind='stable')[:k]
    for j in nearest:
      out[i, train_y[j]] += np.exp(sim[j] / temperature)
  return out


def test_matches_brute_force_reference():
  rng = np.random.default_rng(0)
  train_x = rng.normal(size=(300, 16))
  train_y = rng.integers(0, 7, size=300)
  test_x = rng.normal(size=(530, 16))  # Not a multiple of the test chunk: padded internally.
  for k, temperature in ((1, 0.07), (20, 0.07), (50, 0.5)):
    ours = knn.knn_classify(train_x, train_y, test_x, 7, k, temperature)
    ref = _reference_scores(train_x, train_y, test_x, 7, k, temperature)
    assert ours.shape == (530, 7)
    np.testing.assert_allclose(ours, ref, rtol=2e-4)
    np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1))


def test_k1_is_the_nearest_neighbour_label():
  rng = np.random.default_rng(1)
  train_x, train_y = rng.normal(size=(50, 4)), rng.integers(0, 5, size=50)
  # Test points are tiny perturbations of train points: 1-NN returns those points' labels.
  res = knn.knn_accuracy(train_x, train_y, train_x + 1e-4, train_y, 5, k=1)
  assert res['top1'] == 1.0


def test_separable_problem():
  rng = np.random.default_rng(2)
  directions = np.eye(8)[:4] * 5.0  # 4 classes along 4 axes.
  train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 100)
  train_x = directions[train_y] + rng.normal(scale=0.5, size=(400, 8))
  test_x = directions[test_y] + rng.normal(scale=0.5, size=(100, 8))
  res = knn.knn_accuracy(train_x, train_y, test_x, test_y, 4, k=20, temperature=0.07)
  assert res['top1'] == 1.0 and res['top5'] == 1.0
  assert (res['num_train'], res['num_test']) == (400, 100)
  # Shuffled train labels: the same geometry carries no information.
  shuffled = knn.knn_accuracy(train_x, rng.permutation(train_y), test_x, test_y, 4, k=20)
  assert shuffled['top1'] < 0.5


def test_bad_arguments_fail_early():
  x, y = np.ones((5, 3)), np.zeros(5, int)
  with pytest.raises(ValueError, match=r'k=6 is not allowed: 1 <= k <= 5'):
    knn.knn_classify(x, y, x, 2, k=6)
  with pytest.raises(ValueError, match='temperature=0'):
    knn.knn_classify(x, y, x, 2, k=1, temperature=0)
  with pytest.raises(ValueError, match='dim'):
    knn.knn_classify(x, y, np.ones((2, 4)), 2, k=1)


def test_knn_eval_on_the_tiny_run_data():
  config = config_lib.load_config_file('tiny.py')
  config.eval.knn_max_examples = 300
  encoder = models.build_encoder(config)
  size = config.model.image_size
  variables = jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  params = nn.meta.unbox(variables['params'])
  res = knn.knn_eval(config, encoder, params)
  assert res['knn_num_train'] == 300 and res['knn_num_test'] == 300
  assert res['knn_k'] == config.eval.knn_k
  # Even a random-init encoder's features carry the digit: far above chance (10%).
  assert 0.3 < res['knn_top1'] <= res['knn_top5'] <= 1.0
