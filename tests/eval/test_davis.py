"""DAVIS label propagation (davis.py, davis_data.py): oracle features, DINO parity, the layout,
and one end-to-end `run.evaluate` on synthetic videos with the shared tiny run."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from stop_jax import config as config_lib
from stop_jax.eval import davis, davis_data, davis_metrics, run
from stop_jax.models.vit import position_table
from tests.eval import davis_synthetic


def _moving_scene(grid=(6, 8), frames=5, shift=1):
  """Oracle features of a scene rolling right by `shift` tokens per frame: a token's feature is
  the one-hot id of the scene point it shows. Returns (feats [T, N, N], labels [T, h, w])."""
  h, w = grid
  ids = np.arange(h * w).reshape(h, w)
  labels0 = np.zeros((h, w), np.int64)
  labels0[1:4, 1:3] = 1
  labels0[3:5, 4:7] = 2
  feats, labels = [], []
  for t in range(frames):
    feats.append(np.eye(h * w, dtype=np.float32)[np.roll(ids, t * shift, axis=1).reshape(-1)])
    labels.append(np.roll(labels0, t * shift, axis=1))
  return np.stack(feats), np.stack(labels)


def test_oracle_features_propagate_the_moved_mask():
  grid, patch = (6, 8), 4
  feats, labels = _moving_scene(grid)
  first = np.eye(8, dtype=np.float32)[labels[0].reshape(-1)]  # 3 labels padded to 8 channels
  out = davis.propagate_video(feats, first, grid, patch, n_last_frames=2, size=12)
  # At every token centre, the moved label; at pixel level, exactly the mask the protocol makes
  # from the moved one-hot labels (bilinear upsampling rounds the corners of both alike).
  np.testing.assert_array_equal(out[:, patch // 2 :: patch, patch // 2 :: patch], labels[1:])
  for t in range(1, len(labels)):
    moved = jnp.asarray(np.eye(3, dtype=np.float32)[labels[t]])
    np.testing.assert_array_equal(out[t - 1], davis.upsample_argmax(moved, patch))


def test_propagate_weights_the_topk_keys_within_the_window():
  feats, labels = _moving_scene((6, 8), frames=2)
  onehot = np.eye(3, dtype=np.float32)[labels[0].reshape(-1)]
  args = (jnp.asarray(feats[1]), jnp.asarray(feats[:1]), jnp.asarray(onehot[None]))
  soft = davis.propagate(*args, jnp.array([True]), (6, 8), 12, 5, 0.1)
  # Each query's match has weight e^10, its 4 runners-up (cos 0, tied with every other key, all
  # kept) weight 1 each: the moved label gets >= e^10 / (e^10 + 47).
  assert np.all(np.take_along_axis(np.asarray(soft), labels[1].reshape(-1, 1), 1) > 0.997)
  np.testing.assert_allclose(np.asarray(soft).sum(1), 1.0, rtol=1e-5)
  # The scene moved 2 tokens: with a 1-token window the match is out of reach, every key in the
  # 3x3 window has cos 0 (a tie, all kept), and the query gets the window's mean label.
  feats, labels = _moving_scene((6, 8), frames=2, shift=2)
  onehot = np.eye(3, dtype=np.float32)[labels[0]]  # [h, w, 3]
  args = (jnp.asarray(feats[1]), jnp.asarray(feats[:1]), jnp.asarray(onehot.reshape(1, -1, 3)))
  soft = np.asarray(davis.propagate(*args, jnp.array([True]), (6, 8), 1, 1, 0.1))
  padded = np.pad(onehot, ((1, 1), (1, 1), (0, 0)))
  counts = np.pad(np.ones((6, 8)), 1)
  box = sum(padded[i : i + 6, j : j + 8] for i in range(3) for j in range(3))
  norm = sum(counts[i : i + 6, j : j + 8] for i in range(3) for j in range(3))
  np.testing.assert_allclose(soft, (box / norm[..., None]).reshape(-1, 3), rtol=1e-5)
  # A 2-token window reaches the match (except in columns 0-1, which wrapped around).
  soft = np.asarray(davis.propagate(*args, jnp.array([True]), (6, 8), 2, 5, 0.1))
  moved = np.take_along_axis(soft, labels[1].reshape(-1, 1), 1).reshape(6, 8)
  assert np.all(moved[:, 2:] > 0.99) and np.all(moved[:, :2] < 0.99)


def _dino_label_propagation(query, ctx_feats, ctx_labels, grid, size, topk, temperature):
  """DINO's label_propagation step, restated with torch: [N, D], [M, N, D], [M, N, C] -> [N, C]."""
  torch = pytest.importorskip('torch')
  h, w = grid
  q, k = torch.from_numpy(query), torch.from_numpy(ctx_feats)
  aff = torch.exp(torch.einsum('qd,mkd->mqk', q, k) / temperature)  # [M, Nq, Nk]
  ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
  ii, jj = ii.reshape(-1), jj.reshape(-1)
  near = ((ii[:, None] - ii[None]).abs() <= size) & ((jj[:, None] - jj[None]).abs() <= size)
  aff = aff * near[None].float()
  aff = aff.transpose(2, 1).reshape(-1, h * w)  # [M * Nk, Nq]
  kth = torch.topk(aff, dim=0, k=topk).values.min(dim=0).values
  aff[aff < kth] = 0
  aff = aff / aff.sum(dim=0, keepdim=True)
  labels = torch.from_numpy(ctx_labels).reshape(-1, ctx_labels.shape[-1])  # [M * Nk, C]
  return (labels.T @ aff).T.numpy()


def test_propagate_matches_dinos_procedure():
  rng = np.random.default_rng(0)
  grid, m, d, c = (5, 7), 3, 16, 4
  n = grid[0] * grid[1]
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  query = norm(rng.normal(size=(n, d))).astype(np.float32)
  ctx = norm(rng.normal(size=(m, n, d))).astype(np.float32)
  labels = rng.dirichlet(np.ones(c), size=(m, n)).astype(np.float32)
  for size, topk in ((2, 5), (0, 3)):
    ours = davis.propagate(
      jnp.asarray(query),
      jnp.asarray(ctx),
      jnp.asarray(labels),
      jnp.ones(m, bool),
      grid,
      size,
      topk,
      0.1,
    )
    ref = _dino_label_propagation(query, ctx, labels, grid, size if size else 99, topk, 0.1)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-6)


def test_upsample_argmax_matches_torch_bilinear_and_normalisation():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  soft = rng.random((4, 6, 3)).astype(np.float32)
  t = torch.nn.functional.interpolate(
    torch.from_numpy(soft).permute(2, 0, 1)[None],
    scale_factor=4,
    mode='bilinear',
    align_corners=False,
  )[0]
  lo = t.amin(dim=(1, 2), keepdim=True)
  ref = ((t - lo) / (t.amax(dim=(1, 2), keepdim=True) - lo)).argmax(0).numpy()
  np.testing.assert_array_equal(np.asarray(davis.upsample_argmax(jnp.asarray(soft), 4)), ref)


def test_position_table_interpolates_like_dinos_interpolate_pos_encoding():
  torch = pytest.importorskip('torch')
  table = position_table(8, 8, 32)
  for grid in ((12, 16), (5, 9)):
    t = torch.from_numpy(table).reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / 8, (grid[1] + 0.1) / 8)
    ref = torch.nn.functional.interpolate(t, scale_factor=scale, mode='bicubic')
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 32).numpy()
    np.testing.assert_allclose(position_table(*grid, 32, (8, 8)), ref, atol=1e-5)
  # At the trained grid the table is used as it is (DINO returns it unchanged there too).
  np.testing.assert_array_equal(position_table(8, 8, 32, (8, 8)), table)
  # Default (no trained grid): the sin-cos table at the new grid, unchanged behaviour.
  np.testing.assert_array_equal(position_table(12, 16, 32), position_table(12, 16, 32, (12, 16)))


def test_frame_size_and_layout_errors(tmp_path):
  assert davis_data.frame_size(480, 854, 480, 64, 16) == (480, 832)  # DINO's 832x480
  assert davis_data.frame_size(854, 480, 480, 64, 16) == (832, 480)
  assert davis_data.frame_size(480, 854, 480, 64, 14) == (476, 826)
  with pytest.raises(FileNotFoundError, match='Expected layout: ROOT/ImageSets/2017'):
    davis_data.list_videos(str(tmp_path))
  davis_synthetic.make_davis(str(tmp_path), names=('a', 'b'), frames=3)
  assert [v.name for v in davis_data.list_videos(str(tmp_path), names=('b',))] == ['b']
  with pytest.raises(ValueError, match="'c'"):
    davis_data.list_videos(str(tmp_path), names=('c',))
  os.remove(tmp_path / 'Annotations' / '480p' / 'a' / '00001.png')
  with pytest.raises(FileNotFoundError, match='annotations of 1 frames'):
    davis_data.list_videos(str(tmp_path))


def test_masks_round_trip_as_palette_pngs(tmp_path):
  labels = np.array([[0, 1], [2, 255]], np.uint8)
  path = str(tmp_path / 'm.png')
  davis_data.write_mask(path, labels, davis_data.default_palette())
  read, palette = davis_data.read_mask(path)
  np.testing.assert_array_equal(read, labels)
  assert Image.open(path).mode == 'P' and tuple(palette[1]) == (128, 0, 0)


def _davis_eval_config(root, **overrides):
  c = config_lib.load_config_file('eval/davis.py')
  c.eval.data_dir = root
  c.eval.davis_short_side, c.eval.davis_long_multiple = 48, 4  # 48x64 frames: a 12x16 grid
  for k, v in overrides.items():
    c.eval[k] = v
  return c


@pytest.mark.slow
def test_evaluate_davis_end_to_end_on_synthetic_videos(tiny_run, tmp_path):
  root = str(tmp_path / 'DAVIS')
  gt = davis_synthetic.make_davis(root, names=('slide', 'cross'), frames=6)
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir)  # the shared run stays read-only
  record = run.evaluate(_davis_eval_config(root), workdir)
  saved = json.load(open(os.path.join(workdir, 'eval', 'davis.json')))
  res = saved['results']['last']
  assert res['J&F-Mean'] == pytest.approx((res['J-Mean'] + res['F-Mean']) / 2)
  assert saved['best'] == {'feature_type': 'last', 'J&F-Mean': res['J&F-Mean']}
  assert saved['data']['sequences'] == ['slide', 'cross'] and saved['data']['frames'] == 12
  assert [r['sequence'] for r in saved['davis']['last']['per_sequence']] == ['slide', 'cross']
  # The masks in the results layout: frame 0 is the given mask; the scores are those of the PNGs.
  scores = {}
  for name, masks in gt.items():
    files = sorted(os.listdir(os.path.join(workdir, 'eval', 'davis', 'last', name)))
    assert files == [f'{t:05d}.png' for t in range(6)]
    pred = davis_data.read_masks(
      [os.path.join(workdir, 'eval', 'davis', 'last', name, f) for f in files]
    )
    np.testing.assert_array_equal(pred[0], masks[0])
    assert set(np.unique(pred)) <= {0, 1, 2}
    scores[name] = davis_metrics.video_scores(masks, pred)
  assert davis_metrics.summarize(scores)['J&F-Mean'] == pytest.approx(res['J&F-Mean'])
  table = open(os.path.join(workdir, 'eval', 'davis.md')).read()
  assert f'{100 * res["J&F-Mean"]:.1f}' in table and '| cross_2 |' in table
  assert record['results'] == saved['results']


def test_davis_configs_are_valid_and_checks_name_the_key():
  c = config_lib.load_config_file('eval/davis.py')
  config_lib.validate(c)
  assert (c.eval.protocol, c.eval.name, c.eval.davis_pos_embed) == ('davis', 'davis', 'interpolate')
  assert (c.eval.davis_n_last_frames, c.eval.davis_size_mask_neighborhood) == (7, 12)
  assert (c.eval.davis_topk, c.eval.davis_temperature) == (5, 0.1)
  c = config_lib.load_config_file('eval/davis.py', 'pos_embed=recompute')
  config_lib.validate(c)
  assert c.eval.name == 'davis_recompute'
  for key, bad in (('davis_pos_embed', 'bilinear'), ('davis_topk', 0), ('davis_temperature', 0.0)):
    c = config_lib.load_config_file('eval/davis.py')
    c.eval[key] = bad
    with pytest.raises(config_lib.ConfigError, match=rf'eval\.{key}'):
      config_lib.validate(c)


def test_summary_line_of_a_davis_record():
  record = {
    'name': 'davis',
    'protocol': 'davis',
    'model': {'source': 'export', 'step': None},
    'results': {'last': {'J&F-Mean': 0.5}},
    'best': {'feature_type': 'last', 'J&F-Mean': 0.5},
  }
  assert run.summary_line(record, 'p') == 'davis (export): last J&F-Mean 50.00% -> best last [p]'
