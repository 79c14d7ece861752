"""Tests of the JAX logistic-regression linear probe against scikit-learn."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from stop_jax.eval import logreg

_NUM_CLASSES = 10


@pytest.fixture(scope='module')
def digits():
  x, y = load_digits(return_X_y=True)  # [1797, 64], [1797]
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
  return xtr, xte, ytr, yte


def _random_projection(x: np.ndarray) -> np.ndarray:
  proj = np.random.default_rng(0).normal(size=(64, 64)) / 8.0  # [64, 64], fixed
  return np.tanh((x / 4.0) @ proj)  # [N, 64]


def _accuracy(params, x, y) -> float:
  return float(np.mean(np.asarray(logreg.predict(params, x)) == y))


@pytest.mark.parametrize('features', ['pixels', 'random_projection'])
def test_matches_sklearn(digits, features):
  xtr, xte, ytr, yte = digits
  if features == 'random_projection':
    xtr, xte = _random_projection(xtr), _random_projection(xte)
  xtr, xte = logreg.standardize(xtr, xte)
  l2 = 1e-3
  ours = logreg.fit_logistic_regression(xtr, ytr, _NUM_CLASSES, l2)
  # A tight tol so sklearn is itself at the optimum; its default stops short at small l2.
  sk = LogisticRegression(C=1.0 / (l2 * len(xtr)), max_iter=5000, tol=1e-8).fit(xtr, ytr)
  sk_params = {
    'w': jnp.asarray(sk.coef_.T, jnp.float32),
    'b': jnp.asarray(sk.intercept_, jnp.float32),
  }

  acc_ours, acc_sk = _accuracy(ours, xte, yte), sk.score(xte, yte)
  assert abs(acc_ours - acc_sk) <= 0.01, (acc_ours, acc_sk)
  assert acc_ours > 0.9

  obj_ours = float(logreg.objective(ours, xtr, ytr, l2))
  obj_sk = float(logreg.objective(sk_params, xtr, ytr, l2))
  assert abs(obj_ours - obj_sk) <= 1e-3 * obj_sk, (obj_ours, obj_sk)
  assert ours['loss'] == pytest.approx(obj_ours, rel=1e-5)
  assert 0 < ours['iters'] < 500  # Stopped on the gradient tolerance, not the cap.


def test_max_iters_caps_the_loop(digits):
  xtr, _, ytr, _ = digits
  (xtr,) = logreg.standardize(xtr)
  short = logreg.fit_logistic_regression(xtr, ytr, _NUM_CLASSES, 1e-3, max_iters=3)
  full = logreg.fit_logistic_regression(xtr, ytr, _NUM_CLASSES, 1e-3)
  assert short['iters'] == 3
  assert full['loss'] < short['loss']


def test_larger_l2_gives_smaller_weights(digits):
  xtr, _, ytr, _ = digits
  (xtr,) = logreg.standardize(xtr)
  norms = [
    float(jnp.linalg.norm(logreg.fit_logistic_regression(xtr, ytr, _NUM_CLASSES, l2)['w']))
    for l2 in (1e-3, 1e-2, 1e-1)
  ]
  assert norms[0] > norms[1] > norms[2] > 0, norms


def test_standardize_uses_train_statistics_only():
  rng = np.random.default_rng(0)
  train = rng.normal(3.0, 2.0, size=(500, 4))  # [500, 4]
  test = train[:100] + 10.0  # Shifted by five train stds.
  train_std, test_std = logreg.standardize(train, test)
  np.testing.assert_allclose(train_std.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(train_std.std(0), 1.0, atol=1e-5)
  # Had test statistics been used, the shift would be normalised away.
  np.testing.assert_allclose(test_std, train_std[:100] + 10.0 / train.std(0), atol=1e-4)
  assert train_std.dtype == np.float32 and test_std.dtype == np.float32


def test_standardize_constant_column_is_finite():
  rng = np.random.default_rng(0)
  train = np.concatenate([rng.normal(size=(50, 2)), np.full((50, 1), 7.0)], axis=1)  # [50, 3]
  test = np.concatenate([rng.normal(size=(20, 2)), np.full((20, 1), 9.0)], axis=1)  # [20, 3]
  train_std, test_std = logreg.standardize(train, test)
  assert np.all(np.isfinite(train_std)) and np.all(np.isfinite(test_std))
  np.testing.assert_allclose(train_std[:, 2], 0.0)
  np.testing.assert_allclose(test_std[:, 2], 2.0)  # Centred, not blown up by a ~0 std.
  # And the solver copes with it.
  params = logreg.fit_logistic_regression(train_std, (train[:, 0] > 0).astype(int), 2, 1e-2)
  assert np.isfinite(params['loss']) and np.all(np.isfinite(np.asarray(params['w'])))


def test_linear_probe_on_digits(digits):
  xtr, xte, ytr, yte = digits
  grid = (1e-4, 1e-3, 1e-2, 1e-1)
  out = logreg.linear_probe(xtr, ytr, xte, yte, _NUM_CLASSES, l2_grid=grid)
  assert out['l2'] in grid
  assert set(out['val_accuracy']) == set(grid)
  assert all(0.0 <= a <= 1.0 for a in out['val_accuracy'].values())
  assert out['val_accuracy'][out['l2']] == max(out['val_accuracy'].values())
  assert 0.9 < out['accuracy'] <= 1.0
  assert (out['num_train'], out['num_test'], out['dim']) == (len(xtr), len(xte), 64)


def test_predict_on_separable_data():
  rng = np.random.default_rng(0)
  centres = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])  # [3, 2]
  y = np.repeat(np.arange(3), 30)  # [90]
  x = centres[y] + rng.normal(scale=0.5, size=(90, 2))  # [90, 2]
  params = logreg.fit_logistic_regression(x, y, 3, 1e-3)
  pred = np.asarray(logreg.predict(params, x))
  assert pred.shape == (90,)
  np.testing.assert_array_equal(pred, y)
  np.testing.assert_array_equal(np.asarray(logreg.predict(params, centres)), [0, 1, 2])


def test_single_l2_skips_the_sweep(digits):
  xtr, xte, ytr, yte = digits
  out = logreg.linear_probe(xtr, ytr, xte, yte, _NUM_CLASSES, l2_grid=(1e-2,))
  assert out['l2'] == 1e-2 and out['val_accuracy'] == {}
  # Same as fitting that l2 on all (standardised) train rows directly.
  xtr_s, xte_s = logreg.standardize(xtr, xte)
  direct = logreg.fit_logistic_regression(xtr_s, ytr, _NUM_CLASSES, 1e-2)
  assert out['accuracy'] == pytest.approx(_accuracy(direct, xte_s, yte))
  assert out['iters'] == direct['iters'] and 0.9 < out['train_accuracy'] <= 1.0
