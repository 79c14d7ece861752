"""Table 8's low-resolution targets on hand-built feature maps, and the step that uses them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.train import lowres
from stop_jax.train import step as step_lib


def _feature_map():
  """[1, 16, 2]: a 4x4 grid whose channel 0 is 10 * row + col and channel 1 its negative."""
  rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing='ij')
  v = (10.0 * rows + cols).reshape(1, 16, 1)
  return jnp.asarray(np.concatenate([v, -v], axis=-1), jnp.float32)


def test_max_pooling_takes_each_2x2_cells_maximum_in_raster_order():
  out = np.asarray(lowres.downscale(_feature_map(), (4, 4), 'max'))
  # Cells (0,0), (0,1), (1,0), (1,1) of the 2x2 grid: the max of 10r+c is at the cell's
  # bottom-right token; of -(10r+c) at its top-left one.
  np.testing.assert_allclose(out[0, :, 0], [11, 13, 31, 33])
  np.testing.assert_allclose(out[0, :, 1], [0, -2, -20, -22])


def test_bilinear_half_size_resize_averages_each_2x2_cell():
  out = np.asarray(lowres.downscale(_feature_map(), (4, 4), 'bilinear'))
  # torch's F.interpolate(scale_factor=0.5, mode='bilinear'): the cell's mean.
  np.testing.assert_allclose(out[0, :, 0], [5.5, 7.5, 25.5, 27.5], rtol=1e-6)
  np.testing.assert_allclose(out[0, :, 1], [-5.5, -7.5, -25.5, -27.5], rtol=1e-6)


def test_downscale_keeps_rows_and_columns_apart_on_a_non_square_grid():
  # A 2x4 grid (h=2, w=4): tokens 0..7, coarse grid 1x2.
  feats = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1)
  np.testing.assert_allclose(lowres.downscale(feats, (2, 4), 'max')[0, :, 0], [5, 7])
  np.testing.assert_allclose(lowres.downscale(feats, (2, 4), 'bilinear')[0, :, 0], [2.5, 4.5])


def test_coarse_cells_are_the_distinct_cells_of_the_valid_tokens():
  # 4x4 grid; block 0 covers tokens 0, 1, 4, 5 (one cell) and 6 (cell 1); block 1 has a
  # padding slot at token 15 (cell 3), which must not count.
  tgt_idx = jnp.array([[[0, 1, 4, 5, 6]], [[2, 3, 10, 0, 15]]], jnp.int32)  # [n=2, B=1, Kt=5]
  tgt_valid = jnp.array([[[True] * 5], [[True, True, True, True, False]]])
  idx, valid = lowres.coarse_cells(tgt_idx, tgt_valid, (4, 4))
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert [sorted(set(idx[0, 0][valid[0, 0]]))] == [[0, 1]]
  assert valid[0, 0].sum() == 2
  # Block 1: tokens 2, 3 -> cell 1; 10 -> cell 3 (row 2, col 2); 0 -> cell 0; 15 is padding.
  assert sorted(idx[1, 0][valid[1, 0]]) == [0, 1, 3]
  assert valid[1, 0].sum() == 3
  assert idx.shape == (2, 1, 5) and idx.dtype == np.int32
  assert np.all(idx[~valid] == 0)  # invalid slots gather in range


def _config(lowres_kind):
  c = config_lib.base_config()
  c.model.image_size, c.model.patch_size = 16, 4
  c.model.width, c.model.depth, c.model.num_heads = 32, 2, 4
  c.predictor.width, c.predictor.depth, c.predictor.num_heads = 16, 1, 2
  c.stop.mode = 'off'
  c.loss.lowres = lowres_kind
  return c


def _batch(b=2):
  rng = np.random.default_rng(0)
  perm = np.stack([rng.permutation(16) for _ in range(b)])
  return {
    'image': jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32),
    'ctx_idx': jnp.asarray(np.sort(perm[:, :6], 1), jnp.int32),
    'ctx_valid': jnp.ones((b, 6), bool),
    'tgt_idx': jnp.asarray(np.stack([np.sort(perm[:, 6:10], 1)] * 2), jnp.int32),
    'tgt_valid': jnp.ones((2, b, 4), bool),
  }


def _run(c, weight=1.0):
  c.loss.lowres_weight = weight
  enc, pred = models.build_encoder(c), models.build_predictor(c)
  tx = step_lib.make_optimizer(c)
  from stop_jax.train.schedules import Schedules  # noqa: PLC0415

  sched = Schedules.from_config(c, steps_per_epoch=10)
  state = step_lib.create_train_state(enc, pred, tx, c, jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(c, enc, pred, tx, sched))
  return state, step(state, _batch(), jax.random.key(1))[1]


@pytest.mark.parametrize('kind', ['max', 'bilinear'])
def test_the_step_adds_the_weighted_coarse_loss_and_a_level_token(kind):
  state, metrics = _run(_config(kind), weight=0.5)
  assert 'lowres_token' in state.params['predictor']
  loss, coarse = float(metrics['loss']), float(metrics['loss_lowres'])
  assert coarse > 0
  assert float(metrics['total_loss']) == pytest.approx(loss + 0.5 * coarse, rel=1e-6)


def test_without_lowres_the_params_and_metrics_are_unchanged():
  state, metrics = _run(_config('none'))
  assert 'lowres_token' not in state.params['predictor']
  assert 'loss_lowres' not in metrics
  assert float(metrics['total_loss']) == pytest.approx(float(metrics['loss']))


def test_an_odd_grid_is_refused_in_one_line():
  c = _config('max')
  c.model.image_size = 20  # a 5x5 grid
  with pytest.raises(config_lib.ConfigError, match=r"loss.lowres.*'none' with an odd 5x5 grid"):
    config_lib.validate(c)


def test_coarse_targets_are_the_layer_normed_downscaled_map_at_each_blocks_cells():
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)  # [B, 4x4, D]
  batch = {
    'tgt_idx': jnp.array([[[0, 1, 5, 15]] * 2, [[10, 11, 14, 3]] * 2], jnp.int32),
    'tgt_valid': jnp.array([[[True, True, True, False]] * 2, [[True] * 4] * 2]),
  }
  targets, idx, valid = step_lib.coarse_targets(feats, batch, (4, 4), 'max')
  pooled = np.asarray(feats).reshape(2, 2, 2, 2, 2, 8).max(axis=(2, 4)).reshape(2, 4, 8)
  normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True) + 1e-5)
  # Block 0 covers cell 0 only (token 15 is padding); block 1 cells 3 (10, 11, 14) and 1 (3).
  assert sorted(np.asarray(idx)[0, 0][np.asarray(valid)[0, 0]]) == [0]
  assert sorted(np.asarray(idx)[1, 1][np.asarray(valid)[1, 1]]) == [1, 3]
  for n in range(2):
    for b in range(2):
      for k in np.flatnonzero(np.asarray(valid)[n, b]):
        cell = int(idx[n, b, k])
        np.testing.assert_allclose(targets[n, b, k], normed[b, cell], rtol=1e-5, atol=1e-5)


def test_padding_slots_of_the_coarse_cells_do_not_count_in_the_coarse_loss():
  c = _config('max')
  enc, pred = models.build_encoder(c), models.build_predictor(c)
  state = step_lib.create_train_state(enc, pred, step_lib.make_optimizer(c), c, jax.random.key(0))
  loss_fn = step_lib.make_loss_fn(c, enc, pred)
  batch = _batch()
  # Each block's 4 targets cover at most 4 coarse cells: slots past its distinct cells are
  # padding (coarse_valid False), whatever targets they hold.
  idx, valid = lowres.coarse_cells(batch['tgt_idx'], batch['tgt_valid'], (4, 4))
  assert not bool(jnp.all(valid))  # the batch has padding to ignore
  batch = {**batch, 'coarse_idx': idx, 'coarse_valid': valid}
  rng = np.random.default_rng(1)
  fine = jnp.asarray(rng.normal(size=(2, 2, 4, 32)), jnp.float32)
  coarse = jnp.asarray(rng.normal(size=(2, 2, 4, 32)), jnp.float32)
  moved = jnp.where(valid[..., None], coarse, 100.0)  # only the padding slots change
  params = state.params

  def lowres_loss(targets):
    return float(loss_fn(params, batch, (fine, targets), jax.random.key(2))[1][0]['loss_lowres'])

  assert lowres_loss(moved) == pytest.approx(lowres_loss(coarse), rel=1e-6)
