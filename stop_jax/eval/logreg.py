"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

The paper evaluates the frozen target encoder on 1% IN-1k with a logistic-regression probe on
standardised features. This is that probe in pure JAX: a full-batch L-BFGS solve (optax) run as
one `jax.lax.while_loop` inside one jit, so it works the same on CPU (the offline digits default)
and on accelerators (ImageNet features).

Objective, with N training rows:

  mean_i CE(x_i W + b, y_i) + (l2 / 2) * ||W||^2      (the bias is not penalised)

scikit-learn's `LogisticRegression(C=...)` minimises `sum_i CE + 0.5 / C * ||W||^2` instead, so
the two problems share their minimiser when `C = 1 / (l2 * N)`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

# Memory of the L-BFGS inverse-Hessian approximation; 10 is the usual default and ample for a
# convex problem of this size.
_LBFGS_MEMORY = 10


def standardize(
  train: np.ndarray, *others: np.ndarray, eps: float = 1e-6
) -> tuple[np.ndarray, ...]:
  """Z-scores `train` and every array in `others` with the mean/std of `train` only.

  Args:
    train: features `[N, D]`; the only source of statistics, so no test data leaks in.
    *others: further feature arrays `[M, D]` (validation, test) to map the same way.
    eps: a column whose train std is at most `eps` is treated as constant.

  Returns:
    `(train_std, *others_std)`, float32. A constant column is only centred (divided by 1, not
    by ~0), so it maps to finite values on every split instead of NaN/inf.
  """
  # Statistics in float64: ImageNet-scale feature sums lose digits in float32.
  train64 = np.asarray(train, np.float64)
  mean = train64.mean(axis=0)  # [D]
  std = train64.std(axis=0)  # [D]
  scale = np.where(std > eps, std, 1.0)  # [D]
  out = [((train64 - mean) / scale).astype(np.float32)]
  for x in others:
    out.append(((np.asarray(x, np.float64) - mean) / scale).astype(np.float32))
  return tuple(out)


def _logits(params: dict, x: jax.Array) -> jax.Array:
  # HIGHEST precision: on accelerators the default matmul may drop to bf16/tf32, which is too
  # coarse for the line search to make progress near the optimum.
  return jnp.dot(x, params['w'], precision=jax.lax.Precision.HIGHEST) + params['b']  # [N, C]


def objective(params: dict, x: jax.Array, y: jax.Array, l2: float) -> jax.Array:
  """Mean cross-entropy plus `(l2 / 2) * ||W||^2` (bias unpenalised).

  Args:
    params: `{'w': [D, C], 'b': [C]}`.
    x: features `[N, D]`.
    y: integer labels `[N]`.
    l2: regularisation strength on the per-example (mean) loss scale.

  Returns:
    The scalar objective the solver minimises.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y)  # [N]
  return jnp.mean(ce) + 0.5 * l2 * jnp.sum(jnp.square(params['w']))


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _fit(x, y, l2, tol, max_iters, num_classes: int):
  """The whole L-BFGS solve; `l2`, `tol` and `max_iters` are traced, so one compile per shape."""
  dim = x.shape[1]
  params = {
    'w': jnp.zeros((dim, num_classes), jnp.float32),
    'b': jnp.zeros((num_classes,), jnp.float32),
  }
  value_fn = functools.partial(objective, x=x, y=y, l2=l2)
  solver = optax.lbfgs(memory_size=_LBFGS_MEMORY)
  # The zoom line search stores value and gradient at the accepted point; reusing them saves one
  # full-batch pass per iteration.
  value_and_grad = optax.value_and_grad_from_state(value_fn)

  def step(carry):
    params, state, it = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
    return optax.apply_updates(params, updates), state, it + 1

  def keep_going(carry):
    _, state, it = carry
    grad_norm = otu.tree_norm(otu.tree_get(state, 'grad'))
    # The stored gradient is zero before the first step, so always take that one.
    return (it == 0) | ((it < max_iters) & (grad_norm >= tol))

  init = (params, solver.init(params), jnp.zeros((), jnp.int32))
  params, _, iters = jax.lax.while_loop(keep_going, step, init)
  return params, value_fn(params), iters


def fit_logistic_regression(
  x: jax.Array,
  y: jax.Array,
  num_classes: int,
  l2: float,
  max_iters: int = 500,
  tol: float = 1e-6,
) -> dict:
  """Fits an L2-regularised multinomial logistic regression with full-batch L-BFGS.

  Minimises `objective` (mean cross-entropy + `(l2 / 2) * ||W||^2`, bias free); this matches
  sklearn's `LogisticRegression(C=1 / (l2 * N))`. The solve is one jitted `while_loop` that
  stops once the gradient norm falls below `tol` or after `max_iters` iterations.

  Args:
    x: features `[N, D]` (cast to float32); standardise them first for good conditioning.
    y: integer labels `[N]` in `[0, num_classes)`.
    num_classes: number of classes C.
    l2: regularisation strength, >= 0.
    max_iters: iteration cap.
    tol: gradient-norm stopping tolerance.

  Returns:
    `{'w': [D, C], 'b': [C], 'loss': float, 'iters': int}`, `loss` being the final objective.
  """
  if l2 < 0:
    raise ValueError(f'l2 must be >= 0, got {l2}')
  if max_iters < 1:
    raise ValueError(f'max_iters must be >= 1, got {max_iters}')
  x = jnp.asarray(x, jnp.float32)  # [N, D]
  y = jnp.asarray(y, jnp.int32)  # [N]
  params, loss, iters = _fit(
    x, y, jnp.float32(l2), jnp.float32(tol), jnp.int32(max_iters), num_classes=int(num_classes)
  )
  return {'w': params['w'], 'b': params['b'], 'loss': float(loss), 'iters': int(iters)}


def predict(params: dict, x) -> jax.Array:
  """Most likely class for each row of `x` `[N, D]` -> `[N]` int labels."""
  return jnp.argmax(_logits(params, jnp.asarray(x, jnp.float32)), axis=-1)


def _accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> float:
  return float(np.mean(np.asarray(predict(params, x)) == y))


def linear_probe(
  train_x,
  train_y,
  test_x,
  test_y,
  num_classes: int,
  l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
  val_fraction: float = 0.2,
  seed: int = 0,
  max_iters: int = 500,
) -> dict:
  """Standardise, choose l2 on a held-out split, refit on all train data, score the test set.

  Args:
    train_x: train features `[N, D]`.
    train_y: train labels `[N]`.
    test_x: test features `[M, D]`.
    test_y: test labels `[M]`.
    num_classes: number of classes.
    l2_grid: candidate l2 strengths (per-mean-loss scale, see `objective`); with a single
      value there is no sweep and no held-out fit.
    val_fraction: share of the train set held out (seeded permutation) to pick l2.
    seed: seed of that permutation.
    max_iters: L-BFGS iteration cap for every fit.

  Returns:
    `{'accuracy': test accuracy in [0, 1], 'l2': chosen l2, 'val_accuracy': {l2: acc} (empty
    without a sweep), 'train_accuracy': on all N train rows, 'iters': L-BFGS iterations of the
    final fit, 'num_train': N, 'num_test': M, 'dim': D}`.
  """
  if not l2_grid:
    raise ValueError('l2_grid must not be empty')
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
  train_y = np.asarray(train_y).astype(np.int32)  # [N]
  test_y = np.asarray(test_y).astype(np.int32)  # [M]
  for name, labels in (('train_y', train_y), ('test_y', test_y)):
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f'{name} has labels outside [0, {num_classes})')
  train_x, test_x = standardize(train_x, test_x)  # [N, D], [M, D]
  n, dim = train_x.shape
  n_val = int(round(val_fraction * n))
  if not 0 < n_val < n:
    raise ValueError(f'val_fraction={val_fraction} leaves an empty split of {n} train rows')

  val_accuracy = {}
  if len(l2_grid) == 1:
    best_l2 = float(l2_grid[0])  # Nothing to choose: no held-out fits.
  else:
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    fit_x, fit_y = jnp.asarray(train_x[fit_idx]), jnp.asarray(train_y[fit_idx])
    for l2 in l2_grid:
      params = fit_logistic_regression(fit_x, fit_y, num_classes, float(l2), max_iters=max_iters)
      val_accuracy[float(l2)] = _accuracy(params, train_x[val_idx], train_y[val_idx])
    # Ties go to the strongest regularisation: on a small validation split they are common, and
    # the simpler model is the safer bet.
    best = max(val_accuracy.values())
    best_l2 = max(l2 for l2, acc in val_accuracy.items() if acc == best)

  params = fit_logistic_regression(train_x, train_y, num_classes, best_l2, max_iters=max_iters)
  return {
    'accuracy': _accuracy(params, test_x, test_y),
    'l2': best_l2,
    'val_accuracy': val_accuracy,
    'train_accuracy': _accuracy(params, train_x, train_y),
    'iters': params['iters'],
    'num_train': int(n),
    'num_test': int(test_x.shape[0]),
    'dim': int(dim),
  }
