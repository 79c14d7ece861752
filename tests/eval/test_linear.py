"""The full linear probe: independent heads, the heads' optimiser, and a real probe on digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stop_jax import config as config_lib
from stop_jax.data import labelled
from stop_jax.eval import features, linear
from tests.eval.conftest import WIDTH, init_params, random_images, small_encoder


def test_linear_heads_train_independently(encoder_and_params):
  enc, params = encoder_and_params
  types = {'last/lr=0.1': 'last', 'last4/lr=0.1': 'last4'}
  dims = {n: features.feature_dim(t, WIDTH) for n, t in types.items()}
  norm = linear.feature_norm(None, {'last': WIDTH, 'last4': 4 * WIDTH})
  images = jnp.asarray(random_images(8))
  labels = jnp.arange(8) % 3

  def run(names):
    heads = linear.init_heads(jax.random.key(1), {n: dims[n] for n in names}, 3)
    tx = linear.make_optimizer({n: 0.1 for n in names}, 10, kind='sgd', weight_decay=1e-2)
    step = jax.jit(linear.make_train_step(enc, tx, {n: types[n] for n in names}))
    state = tx.init(heads)
    for _ in range(3):
      heads, state, losses = step(heads, state, params, norm, images, labels)
    return heads, losses

  both, losses = run(list(types))
  alone, _ = run(['last4/lr=0.1'])
  assert set(losses) == set(types)
  np.testing.assert_allclose(both['last4/lr=0.1']['w'], alone['last4/lr=0.1']['w'], atol=1e-6)


@pytest.mark.parametrize('kind', ['sgd', 'lars'])
def test_head_optimizer_decays_kernel_not_bias(kind):
  heads = {'h': {'w': jnp.ones((4, 3)), 'b': jnp.ones((3,))}}
  tx = linear.make_optimizer({'h': 0.5}, 10, kind=kind, momentum=0.0, weight_decay=0.1)
  zero = jax.tree.map(jnp.zeros_like, heads)
  updates, _ = tx.update(zero, tx.init(heads), heads)
  new = optax.apply_updates(heads, updates)
  assert np.all(np.asarray(new['h']['w']) < 1.0)
  np.testing.assert_array_equal(np.asarray(new['h']['b']), 1.0)
  with pytest.raises(ValueError, match="'adam' is not allowed"):
    linear.make_optimizer({'h': 0.5}, 10, kind='adam')


@pytest.mark.slow  # trains a probe for 6 epochs
def test_linear_probe_learns_on_augmented_digits():
  # A random-init frozen encoder: the probe alone must get well above chance (10%).
  enc = small_encoder(depth=4)
  params = init_params(enc)
  c = config_lib.load_config_file('eval/tiny.py', 'protocol=linear')
  c.eval.linear_epochs, c.eval.linear_lrs = 6, (0.03, 0.3)
  c.eval.linear_crop_scale = (0.8, 1.0)
  train = labelled.EvalData('digits', split='train', image_size=16, resize_ratio=1.0)
  test = labelled.EvalData('digits', split='test', image_size=16, resize_ratio=1.0)
  res = linear.linear_eval(c, enc, params, train, test)
  assert set(res['heads']) == {'last/lr=0.03', 'last/lr=0.3', 'last4/lr=0.03', 'last4/lr=0.3'}
  assert res['num_test'] == 360 and res['num_classes'] == 10
  assert res['steps'] == 6 * (1437 // 128)
  for t in ('last', 'last4'):
    assert res[t]['top1'] > 0.4, res
    assert res[t]['top5'] >= res[t]['top1']
    assert res[t]['top1'] == max(h['top1'] for h in res['heads'].values() if h['feature_type'] == t)
