"""Schedules, optimiser, EMA, loss and the jitted step (no recompilation)."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.train import step as step_lib
from stop_jax.train.schedules import Schedules


def _config():
  c = config_lib.base_config()
  c.model.image_size, c.model.patch_size = 16, 4
  c.model.width, c.model.depth, c.model.num_heads = 32, 2, 4
  c.predictor.width, c.predictor.depth, c.predictor.num_heads = 16, 1, 2
  return c


# ---- schedules against the official closed forms ------------------------------------------


def _sched(**optim):
  c = config_lib.base_config()
  c.optim.update(
    dict(
      epochs=10,
      warmup_epochs=2,
      start_lr=0.1,
      lr=1.0,
      final_lr=0.01,
      weight_decay=0.04,
      final_weight_decay=0.4,
    )
  )
  c.optim.update(optim)
  return Schedules.from_config(c, steps_per_epoch=10)  # warmup 20 steps, horizon 100


def test_learning_rate_closed_form():
  s = _sched()
  # Step s uses the official scheduler's value at s+1 (it steps before the update).
  assert float(s.learning_rate(0)) == pytest.approx(0.1 + (1 / 20) * 0.9)
  assert float(s.learning_rate(9)) == pytest.approx(0.1 + (10 / 20) * 0.9)
  assert float(s.learning_rate(19)) == pytest.approx(1.0)  # warmup ends at the peak
  mid = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 40 / 80))
  assert float(s.learning_rate(59)) == pytest.approx(mid, rel=1e-5)
  assert float(s.learning_rate(99)) == pytest.approx(0.01, rel=1e-4)
  assert float(s.learning_rate(150)) == pytest.approx(0.01, rel=1e-4)  # floored at final_lr


def test_constant_lr_tail():
  s = _sched(constant_lr_after_epoch=5)
  # Official: from scheduler step t = 50 (optimiser step 49) on, the value at t = 50.
  held = float(s.learning_rate(49))
  assert held == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 30 / 80)), rel=1e-6)
  assert float(s.learning_rate(50)) == held
  assert float(s.learning_rate(80)) == held
  assert float(s.learning_rate(48)) > held  # still decaying before the threshold


def test_weight_decay_and_momentum_closed_form():
  s = _sched()
  wd = lambda t: 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * t / 100))  # noqa: E731
  for step in (0, 10, 49, 99):
    assert float(s.weight_decay_at(step)) == pytest.approx(wd(step + 1), rel=1e-5)
  assert float(s.weight_decay_at(500)) == pytest.approx(0.4)
  assert float(s.momentum(0)) == pytest.approx(0.996)
  assert float(s.momentum(50)) == pytest.approx(0.998)
  assert float(s.momentum(100)) == pytest.approx(1.0)
  assert float(s.momentum(1000)) == pytest.approx(1.0)


def test_ipe_scale_stretches_the_horizon():
  assert _sched(ipe_scale=1.25).horizon == 125


# ---- optimiser ----------------------------------------------------------------------------


def test_no_weight_decay_on_biases_and_norm_scales():
  c = _config()
  c.stop.mode = 'off'  # has a mask token, which the official code decays
  enc, pred = models.build_encoder(c), models.build_predictor(c)
  # The mask depends on the names only: the params' shapes (no initialisation) are enough.
  params = jax.eval_shape(lambda k: step_lib.init_params(enc, pred, c, k), jax.random.key(0))
  mask = step_lib.decay_mask(params)
  assert mask['encoder']['blocks']['layers']['attn']['qkv']['kernel']
  assert not mask['encoder']['blocks']['layers']['attn']['qkv']['bias']
  assert not mask['encoder']['blocks']['layers']['norm1']['scale']
  assert mask['predictor']['mask_token']
  assert mask['predictor']['predictor_embed']['kernel']


# ---- the step -----------------------------------------------------------------------------


def _setup(c):
  enc, pred = models.build_encoder(c), models.build_predictor(c)
  tx = step_lib.make_optimizer(c)
  sched = Schedules.from_config(c, steps_per_epoch=10)
  # Jitted: one compile instead of hundreds of eager ops.
  state = jax.jit(lambda k: step_lib.create_train_state(enc, pred, tx, c, k))(jax.random.key(0))
  return enc, pred, tx, sched, state


def _batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  perm = np.stack([rng.permutation(16) for _ in range(b)])
  return {
    'image': jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32),
    'ctx_idx': jnp.asarray(np.sort(perm[:, :6], 1), jnp.int32),
    'ctx_valid': jnp.asarray(np.arange(6)[None] < np.array([6, 6, 5, 6])[:b, None]),
    'tgt_idx': jnp.asarray(
      np.stack([np.sort(perm[:, 6 + 2 * i : 8 + 2 * i], 1) for i in range(4)]), jnp.int32
    ),
    'tgt_valid': jnp.ones((4, b, 2), bool),
  }


@pytest.fixture(scope='module')
def one_step():
  """One jitted step of the default step config with the l1 penalty on A (the ablation, which
  only adds to the total loss), from a fresh state: (sched, state before, state after, metrics).
  Shared by the EMA and the penalty tests: compiling is the slow part."""
  c = _config()
  c.stop.reg, c.stop.reg_weight = 'l1', 1e-3
  enc, pred, tx, sched, state = _setup(c)
  before = jax.tree.map(np.asarray, state)
  new, metrics = jax.jit(step_lib.make_train_step(c, enc, pred, tx, sched))(
    state, _batch(), jax.random.key(1)
  )
  return sched, before, new, metrics


def test_ema_update_and_schedules_inside_the_step(one_step):
  sched, before, new, metrics = one_step
  target0 = before.target_params
  m = 0.996  # momentum at step 0
  expected = jax.tree.map(
    lambda t, p: m * t + (1 - m) * np.asarray(p), target0, new.params['encoder']
  )
  chex.assert_trees_all_close(new.target_params, expected, atol=1e-7)
  assert int(new.step) == 1
  assert float(metrics['lr']) == pytest.approx(float(sched.learning_rate(0)))
  assert float(metrics['wd']) == pytest.approx(float(sched.weight_decay_at(0)))
  assert float(metrics['ctx_tokens']) == pytest.approx(5.75)
  assert float(metrics['A_norm']) > 0
  # The target encoder never receives gradients: it only moved by the EMA.
  assert not jax.tree.all(
    jax.tree.map(
      lambda a, b: np.array_equal(a, b), target0, jax.tree.map(np.asarray, new.target_params)
    )
  )


@pytest.mark.slow
def test_step_compiles_once_and_loss_decreases():
  c = _config()
  c.optim.warmup_epochs, c.optim.start_lr, c.optim.lr = 0, 1e-3, 1e-3
  enc, pred, tx, sched, state = _setup(c)
  body = step_lib.make_train_step(c, enc, pred, tx, sched)

  @chex.assert_max_traces(n=1)
  def traced(state, batch, rng):
    return body(state, batch, rng)

  step = jax.jit(traced, donate_argnums=(0,))
  losses = []
  for i in range(30):
    state, metrics = step(state, _batch(seed=i % 2), jax.random.key(1))
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_padded_target_slots_do_not_count_in_the_loss():
  pred = jnp.ones((1, 1, 3, 2))
  target = jnp.zeros((1, 1, 3, 2)).at[..., 2, :].set(100.0)
  valid = jnp.array([[[True, True, False]]])
  assert float(step_lib.prediction_loss(pred, target, valid)) == pytest.approx(0.5)
  assert float(step_lib.prediction_loss(pred, target, valid, 'l2')) == pytest.approx(1.0)


def test_multi_layer_targets_layer_norm_the_mean_of_the_normed_blocks():
  c = _config()
  enc = models.build_encoder(c)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  # Jitted: a few compiles instead of hundreds of eager ops.
  params = jax.jit(lambda k, x: nn.unbox(enc.init(k, x)['params']))(jax.random.key(1), images)
  # Blocks that change the tokens and a final norm with a non-trivial affine part (as after
  # training), so that the two formulas differ.
  params['blocks'] = jax.tree.map(lambda w: 20 * w if w.ndim > 2 else w, params['blocks'])
  k1, k2 = jax.random.split(jax.random.key(2))
  params['norm'] = {
    'scale': 1 + jax.random.normal(k1, params['norm']['scale'].shape),
    'bias': jax.random.normal(k2, params['norm']['bias'].shape),
  }
  features = jax.jit(step_lib.target_features, static_argnums=(0, 3, 4))
  one = features(enc, params, images, 1, 'norm_of_mean')
  np.testing.assert_allclose(one.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(one.std(-1), 1, atol=1e-2)
  _, blocks = jax.jit(lambda p, x: enc.apply({'params': p}, x, return_blocks=True))(params, images)
  # Official (StoP `VisionTransformer.forward(K)` then `F.layer_norm`): LN(mean_k norm(x_k)).
  ln = step_lib.layer_norm
  official = features(enc, params, images, 2, 'norm_of_mean')
  np.testing.assert_allclose(official, ln((blocks[0] + blocks[1]) / 2), atol=1e-5)
  other = features(enc, params, images, 2, 'mean_of_norms')
  np.testing.assert_allclose(other, (ln(blocks[0]) + ln(blocks[1])) / 2, atol=1e-5)
  # The two formulas really differ here, so the test can tell them apart.
  assert float(jnp.max(jnp.abs(official - other))) > 1e-2


def test_target_std_is_the_spread_of_the_targets_across_images(one_step):
  _, before, _, metrics = one_step
  enc = models.build_encoder(_config())
  feats = step_lib.target_features(enc, before.target_params, _batch()['image'])
  assert float(metrics['target_std']) == pytest.approx(float(jnp.mean(jnp.std(feats, 0))), rel=1e-5)
  assert float(metrics['target_std']) > 0.05


def test_l1_penalty_adds_to_the_loss(one_step):
  _, before, _, metrics = one_step
  a = before.params['predictor']['predictor_embed']['kernel']
  assert float(metrics['total_loss'] - metrics['loss']) == pytest.approx(
    1e-3 * np.abs(a).sum(), rel=1e-4
  )


# ---- each piece of the math against hand-computed values --------------------------------------


def test_smooth_l1_is_huber_with_beta_one_averaged_over_valid_tokens_and_features():
  # |d| below and above 1 (where smooth-L1 and half-MSE differ), and two blocks with 2 and 1
  # valid tokens: a mean over all valid elements weighs the tokens, not the blocks.
  pred = jnp.array([[[[0.5, 3.0], [0.0, 0.0]]], [[[-2.0, 0.2], [9.0, 9.0]]]])  # [n=2, B=1, 2, 2]
  target = jnp.zeros_like(pred)
  valid = jnp.array([[[True, False]], [[True, True]]])
  # Elements: 0.5 -> 0.125, 3 -> 2.5 | -2 -> 1.5, 0.2 -> 0.02 | 9 -> 8.5, 9 -> 8.5; 3 tokens x 2.
  smooth = (0.125 + 2.5 + 1.5 + 0.02 + 8.5 + 8.5) / 6
  assert float(step_lib.prediction_loss(pred, target, valid)) == pytest.approx(smooth, rel=1e-6)
  mse = (0.25 + 9 + 4 + 0.04 + 81 + 81) / 6
  assert float(step_lib.prediction_loss(pred, target, valid, 'l2')) == pytest.approx(mse, rel=1e-6)


def test_a_penalty_is_the_sum_of_abs_or_squares():
  a = jnp.array([[0.5, -2.0], [3.0, 0.1]])
  assert float(step_lib.a_penalty(a, 'l1')) == pytest.approx(5.6)
  assert float(step_lib.a_penalty(a, 'l2')) == pytest.approx(0.25 + 4 + 9 + 0.01)
  assert float(step_lib.a_penalty(a, 'none')) == 0.0


def test_adamw_decays_kernels_and_the_mask_token_but_not_biases_or_norm_scales():
  c = _config()
  c.stop.mode = 'off'
  enc, pred = models.build_encoder(c), models.build_predictor(c)
  params = jax.jit(lambda k: step_lib.init_params(enc, pred, c, k))(jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.5, params)  # no zero leaf: decay shows on every one
  tx = step_lib.make_optimizer(c)
  opt = tx.init(params)
  opt.hyperparams['learning_rate'] = jnp.asarray(1.0)
  opt.hyperparams['weight_decay'] = jnp.asarray(0.1)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, opt, params)  # zero gradients: only the decoupled decay moves
  flat = dict(jax.tree_util.tree_flatten_with_path(updates)[0])
  for path, u in flat.items():
    p = params
    for k in path:
      p = p[k.key]
    decayed = path[-1].key not in ('bias', 'scale')
    np.testing.assert_allclose(u, -0.1 * p if decayed else 0.0, rtol=1e-6, err_msg=str(path))


def test_clipping_covers_the_encoder_only_by_default_with_torchs_epsilon():
  params = {'encoder': {'w': jnp.ones(3)}, 'predictor': {'w': jnp.ones(4)}}
  grads = {'encoder': {'w': jnp.full(3, 4.0)}, 'predictor': {'w': jnp.full(4, 5.0)}}
  enc_norm = 4.0 * np.sqrt(3)
  scaled = step_lib.clip_by_global_norm(1.0).update(grads['encoder'], None)[0]
  np.testing.assert_allclose(scaled['w'], 4.0 / (enc_norm + 1e-6), rtol=1e-6)
  mask = step_lib.clip_mask(params, 'encoder')
  assert mask == {'encoder': {'w': True}, 'predictor': {'w': False}}
  assert step_lib.clip_mask(params, 'all') == {'encoder': {'w': True}, 'predictor': {'w': True}}


def test_no_gradient_reaches_the_target_branch():
  c = _config()
  enc = models.build_encoder(c)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = jax.jit(lambda k, x: nn.unbox(enc.init(k, x)['params']))(jax.random.key(1), images)
  for k in (1, 2):
    grads = jax.grad(lambda p, k=k: jnp.sum(step_lib.target_features(enc, p, images, k) ** 3))(
      params
    )
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads)), k


def test_bf16_ema_rounds_stochastically_and_tracks_the_float32_ema():
  # A per-step change far below bf16's resolution at 1.0 (2**-7): round-to-nearest would leave
  # the target at exactly 1.0 forever; stochastic rounding moves it by the right amount on average.
  target = {'w': jnp.ones((100_000,), jnp.bfloat16)}
  online = {'w': jnp.full((100_000,), 1.0 + 2**-9, jnp.float32)}
  new = step_lib.ema_update(target, online, 0.5, jax.random.key(0))['w']
  assert new.dtype == jnp.bfloat16
  values = np.unique(np.asarray(new, np.float32))
  np.testing.assert_array_equal(values, [1.0, 1.0 + 2**-7])  # the two neighbours only
  assert float(jnp.mean(new.astype(jnp.float32))) == pytest.approx(1.0 + 2**-10, abs=3e-5)


def test_a_step_at_lr_0_and_weight_decay_0_leaves_the_encoder_as_initialised():
  # configs/ablation.py's `random_init` reference row relies on this.
  c = _config()
  c.optim.update(dict(start_lr=0.0, lr=0.0, final_lr=0.0, weight_decay=0.0, final_weight_decay=0.0))
  enc, pred, tx, sched, state = _setup(c)
  before = jax.tree.map(np.asarray, state.target_params)
  new, metrics = jax.jit(step_lib.make_train_step(c, enc, pred, tx, sched))(
    state, _batch(), jax.random.key(1)
  )
  assert float(metrics['grad_norm']) > 0 and float(metrics['update_norm']) == 0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new.target_params), strict=True):
    np.testing.assert_allclose(np.asarray(b), a, rtol=0, atol=1e-7)
