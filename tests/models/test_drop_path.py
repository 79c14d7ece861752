"""Stochastic depth: identity at rate 0 and in evaluation, the expected keep rate when on, and
the pretraining encoder unchanged (same params, same outputs) when it is off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax.models.layers import drop_path, drop_path_rate
from stop_jax.models.vit import VisionTransformer


def test_drop_path_identity_at_rate_0_and_when_deterministic():
  x = jax.random.normal(jax.random.key(0), (8, 4, 3))
  assert drop_path(x, 0.0, jax.random.key(1), False) is x
  assert drop_path(x, 0.5, jax.random.key(1), True) is x


def test_drop_path_keeps_whole_examples_at_the_expected_rate_and_mean():
  x = jnp.ones((20_000, 3, 2))
  y = np.asarray(drop_path(x, 0.3, jax.random.key(2), False))
  per_example = y.reshape(len(y), -1)
  assert np.all((per_example == 0) | np.isclose(per_example, 1 / 0.7))  # whole rows
  assert np.all(per_example.min(1) == per_example.max(1))
  assert (per_example[:, 0] > 0).mean() == pytest.approx(0.7, abs=0.01)
  assert y.mean() == pytest.approx(1.0, abs=0.02)  # unbiased


def test_drop_path_rate_rises_linearly_over_blocks():
  assert [drop_path_rate(0.2, i, 5) for i in range(5)] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])


@pytest.mark.parametrize('scan', [False, True])
def test_encoder_with_drop_path_is_the_same_encoder_in_eval(scan):
  kw = dict(patch_size=4, width=16, depth=3, num_heads=2, mlp_dim=32, scan_blocks=scan)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  plain = VisionTransformer(**kw)
  params = plain.init(jax.random.key(1), images)['params']
  dropped = VisionTransformer(**kw, drop_path=0.5)
  # Same params tree, and in eval (train=False) the same function, bit for bit.
  assert jax.tree.structure(
    dropped.init(jax.random.key(1), images)['params']
  ) == jax.tree.structure(params)
  a = plain.apply({'params': params}, images)
  np.testing.assert_array_equal(a, dropped.apply({'params': params}, images))
  # Training draws per block: outputs move, and differ with the dropout key.
  t1 = dropped.apply({'params': params}, images, train=True, rngs={'dropout': jax.random.key(2)})
  t2 = dropped.apply({'params': params}, images, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(t1, a) and not np.allclose(t1, t2)
