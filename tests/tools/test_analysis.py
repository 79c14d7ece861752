"""The analysis behind the notebooks (paper Figs. 4, 5, 6): maths, loaders and plots."""

import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.models.layers import sincos_2d
from stop_jax.runtime import checkpointing
from stop_jax.tools.analysis import figures, heatmaps, regularisation, runs, similarity
from stop_jax.train import step as step_lib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
  yield
  plt.close('all')


def _tiny(steps=2, **overrides):
  return runs.tiny_config(steps, overrides)


def _write_run(workdir, sigma, rows, mode='masked'):
  """A fake run directory: the config.json the trainer writes and the given metric rows."""
  config = _tiny(**{'stop.sigma': sigma, 'stop.mode': mode})
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return str(workdir)


# ---- configs and runs (runs.py) -------------------------------------------------------------


def test_config_round_trips_through_json_with_tuples_and_lock():
  config = _tiny(**{'stop.sigma': 0.7, 'mask.target_scale': [0.1, 0.3]})
  back = config_lib.from_dict(json.loads(config.to_json_best_effort()))
  assert back.to_dict() == config.to_dict()
  assert back.stop.sigma == 0.7
  assert back.mask.target_scale == (0.1, 0.3)
  assert isinstance(back.data.crop_scale, tuple)
  with pytest.raises(AttributeError):
    back.stop.sgima = 0.1  # locked: a typo is an error


def test_config_from_dict_names_bad_keys():
  with pytest.raises(config_lib.ConfigError, match='config.stop.sgima'):
    config_lib.from_dict({'stop': {'sgima': 0.1}})
  with pytest.raises(config_lib.ConfigError, match='config.stop='):
    config_lib.from_dict({'stop': 3})


def test_load_config_and_run_errors_name_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    config_lib.load_json(str(tmp_path))
  _write_run(tmp_path, 0.25, [])
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    runs.load_run(str(tmp_path))
  assert not runs.has_checkpoint(str(tmp_path))


def test_tiny_config_applies_overrides_and_rejects_zero_steps():
  config = _tiny(steps=7, **{'stop.sigma': 0.5})
  assert (config.total_steps, config.stop.sigma, config.eval.probe) == (7, 0.5, False)
  assert config.model.image_size == 32  # really configs/tiny.py
  with pytest.raises(ValueError, match='steps=0'):
    runs.tiny_config(0)


@pytest.fixture(scope='module')
def run(tiny_run):
  """conftest's 30-step tiny run, read back (its training makes the tests that use it slow)."""
  return runs.load_run(tiny_run)


@pytest.mark.slow
def test_load_run_reads_a_trained_run(run, tiny_run):
  assert run.workdir == tiny_run and run.step == run.config.total_steps and run.grid == (8, 8)
  assert runs.has_checkpoint(tiny_run)
  assert not runs.ensure_tiny_run(tiny_run)  # an existing run is kept, not retrained


@pytest.mark.slow
def test_load_run_reads_back_the_saved_params(run, tmp_path):
  config = run.config
  tx = step_lib.make_optimizer(config)
  state = step_lib.TrainState(
    step=jnp.asarray(3, jnp.int32),
    params=run.params,
    target_params=run.target_params,
    opt_state=tx.init(run.params),
  )
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort())
  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  ckpt.save(3, state, {})
  ckpt.wait()
  ckpt.close()
  assert runs.has_checkpoint(str(tmp_path))
  assert not runs.ensure_tiny_run(str(tmp_path))  # an existing run is kept, not retrained

  loaded = runs.load_run(str(tmp_path))
  assert loaded.step == 3 and loaded.grid == (8, 8)
  a, b = loaded.projection()
  embed = state.params['predictor']['predictor_embed']
  np.testing.assert_array_equal(a, np.asarray(embed['kernel']))
  np.testing.assert_array_equal(b, np.asarray(embed['bias']))
  jax.tree.map(np.testing.assert_array_equal, loaded.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, loaded.target_params, state.target_params)
  np.testing.assert_array_equal(loaded.positions(), sincos_2d(8, 8, config.predictor.width))


# ---- Fig. 5 (similarity.py) -----------------------------------------------------------------


def test_similarity_cosine_and_dot():
  q = np.array([[3.0, 4.0]])
  k = np.array([[1.0, 0.0], [0.0, 2.0]])
  np.testing.assert_allclose(similarity.similarity(q, k, 'cosine'), [[0.6, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(similarity.similarity(q, k, 'dot'), [[3.0, 8.0]], rtol=1e-6)
  with pytest.raises(ValueError, match='metric'):
    similarity.similarity(q, k, 'l2')


def _sincos_setup(grid=(6, 5), d_e=48, d_p=32, seed=0):
  a, b = similarity.random_projection(jax.random.key(seed), d_e, d_p)
  return a * 10.0, b, sincos_2d(*grid, d_p)  # a larger A, so the noise matters at sigma ~ 1


@pytest.mark.parametrize('metric', similarity.METRICS)
def test_deterministic_query_peaks_exactly_at_its_position(metric):
  grid = (6, 5)
  a, b, pos = _sincos_setup(grid)
  queries = list(range(grid[0] * grid[1]))
  maps = similarity.position_similarity_maps(
    a, b, pos, grid, queries, [0.0], jax.random.key(1), num_samples=3, metric=metric
  )
  assert maps.shape == (1, len(queries), *grid)
  np.testing.assert_array_equal(maps[0].reshape(len(queries), -1).argmax(-1), queries)


def test_noise_flattens_the_map_and_samples_are_kept_on_request():
  grid = (6, 5)
  a, b, pos = _sincos_setup(grid)
  queries = similarity.default_queries(grid)
  sigmas = [0.0, 0.5, 1e3]
  maps = similarity.position_similarity_maps(
    a, b, pos, grid, queries, sigmas, jax.random.key(2), num_samples=128
  )
  entropy = similarity.map_entropy(maps)  # [sigma, Q]
  assert np.all(entropy[1] > entropy[0]) and np.all(entropy[2] > entropy[1] + 0.1)
  spread = maps.max(axis=(-1, -2)) - maps.min(axis=(-1, -2))  # [sigma, Q]
  assert np.all(spread[2] < 0.25 * spread[0])  # the averaged huge-noise map is nearly flat
  per_sample = similarity.position_similarity_maps(
    a, b, pos, grid, queries, sigmas, jax.random.key(2), num_samples=4, average=False
  )
  assert per_sample.shape == (3, len(queries), 4, *grid)
  np.testing.assert_allclose(per_sample[0], np.broadcast_to(per_sample[0, :, :1], (3, 4, *grid)))
  assert np.std(per_sample[2], axis=1).mean() > 0.1  # each sample points somewhere else


def test_position_similarity_maps_rejects_bad_input():
  grid = (6, 5)
  a, b, pos = _sincos_setup(grid)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='query_idx'):
    similarity.position_similarity_maps(a, b, pos, grid, [30], [0.1], key)
  with pytest.raises(ValueError, match='sigmas'):
    similarity.position_similarity_maps(a, b, pos, grid, [0], [-0.1], key)
  with pytest.raises(ValueError, match='psi'):
    similarity.position_similarity_maps(a, b, pos[:-1], grid, [0], [0.1], key)


def test_map_entropy_bounds():
  flat = np.zeros((4, 5))
  np.testing.assert_allclose(similarity.map_entropy(flat), np.log(20), rtol=1e-6)
  peak = np.zeros((4, 5))
  peak[1, 2] = 1.0
  assert similarity.map_entropy(peak, temperature=0.01) < 1e-6
  probs = similarity.spatial_softmax(np.random.default_rng(0).normal(size=(2, 4, 5)))
  np.testing.assert_allclose(probs.sum(axis=(-1, -2)), 1.0, rtol=1e-6)


def test_random_projection_matches_the_init():
  a, b = similarity.random_projection(jax.random.key(0), 256, 128)
  assert a.shape == (256, 128) and b.shape == (128,) and not b.any()
  assert abs(a.std() - 0.02) < 0.001


def test_plot_similarity_maps_axes_and_data():
  grid = (6, 5)
  maps = np.random.default_rng(0).normal(size=(4, 3, *grid))
  fig = similarity.plot_similarity_maps(maps, grid, [0, 7, 29], ['a', 'b', 'c', 'd'], title='t')
  images = [ax for ax in fig.axes if ax.images and ax.get_label() != '<colorbar>']
  assert len(images) == 12 and len(fig.axes) == 12 + 3  # one colour bar per row
  np.testing.assert_allclose(images[5].images[0].get_array(), maps[1, 1], rtol=1e-6)  # row 1, col 1
  with pytest.raises(ValueError, match='column titles'):
    similarity.plot_similarity_maps(maps, grid, [0, 7, 29], ['a'])


# ---- Fig. 6 (heatmaps.py) -------------------------------------------------------------------


def test_softmax_sums_to_one_and_an_exact_prediction_points_at_its_patch():
  tokens = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
  probs = heatmaps.token_similarity_softmax(tokens, tokens, 1.0)  # each token predicted exactly
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(probs.argmax(-1), np.arange(64))
  sharp = heatmaps.token_similarity_softmax(tokens, tokens)  # the default temperature, 0.1
  np.testing.assert_allclose(sharp.sum(-1), 1.0, rtol=1e-5)
  assert np.all(sharp.max(-1) > probs.max(-1))
  with pytest.raises(ValueError, match='temperature=0'):
    heatmaps.token_similarity_softmax(tokens, tokens, 0)


def test_sample_target_mask_is_one_block_and_a_disjoint_context():
  config = _tiny()
  ctx, tgt = heatmaps.sample_target_mask(config, seed=3)
  assert ctx.shape == tgt.shape == (64,)
  assert not np.any(ctx & tgt) and ctx.sum() > config.mask.min_keep
  rows, cols = np.nonzero(tgt.reshape(8, 8))
  assert tgt.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a full rectangle


@pytest.mark.slow
def test_prediction_heatmaps_from_the_real_model(run, monkeypatch):
  image = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
  ctx, tgt = heatmaps.sample_target_mask(run.config, seed=1)
  patches = np.flatnonzero(tgt)[[0, -1]].tolist()
  maps = heatmaps.prediction_heatmaps(run, image, ctx, tgt, patches)
  assert maps.shape == (2, 8, 8)
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  noisy = heatmaps.prediction_heatmaps(run, image, ctx, tgt, patches, jax.random.key(1))
  assert not np.allclose(noisy, maps)  # StoP noise reaches the prediction

  # A predictor that returns exactly the target tokens: every map peaks at its own patch.
  tokens = heatmaps.image_tokens(run, image)
  monkeypatch.setattr(
    heatmaps, 'predict_masked_tokens', lambda run, im, c, t, rng=None: tokens[np.flatnonzero(t)]
  )
  all_patches = np.flatnonzero(tgt)
  exact = heatmaps.prediction_heatmaps(run, image, ctx, tgt, all_patches[::-1])
  np.testing.assert_array_equal(exact.reshape(len(all_patches), -1).argmax(-1), all_patches[::-1])


@pytest.mark.slow
def test_padded_compiled_prediction_equals_the_model_applied_to_the_bare_indices(run):
  image = np.random.default_rng(2).normal(size=(32, 32, 3)).astype(np.float32)
  ctx, tgt = heatmaps.sample_target_mask(run.config, seed=4)
  ctx_idx, tgt_idx = np.flatnonzero(ctx)[None], np.flatnonzero(tgt)[None, None]

  @jax.jit  # one compile instead of one per operation
  def bare(params, rng):
    feats = run.encoder.apply({'params': params['encoder']}, image[None], ctx_idx)
    args = ({'params': params['predictor']}, feats, ctx_idx, tgt_idx)
    if rng is None:
      return run.predictor.apply(*args, deterministic=True)[0, 0]
    return run.predictor.apply(*args, rngs={'stop': rng})[0, 0]

  for rng in (None, jax.random.key(5)):
    padded = heatmaps.predict_masked_tokens(run, image, ctx, tgt, rng)
    assert padded.shape == (tgt.sum(), run.config.model.width)
    np.testing.assert_allclose(padded, bare(run.params, rng), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_heatmap_figures_show_runs_side_by_side_with_contrast(run):
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  compared = figures.compared_runs(run, run)
  assert list(compared) == [figures.run_label(run), f'{figures.run_label(run)} (baseline)']
  figs, panels = figures.heatmap_figures(compared, images, noise_draws=1)
  assert len(figs) == len(panels) == 2
  overlays = [ax for ax in figs[0].axes if len(ax.images) == 2]  # image + heatmap
  assert len(overlays) == 4 and len(figs[0].axes) == 1 + 4 + 1  # masked image, maps, colour bar
  for panel in panels:
    assert list(panel.maps) == [t for name in compared for t in (name, f'{name}, draw 0')]
    assert panel.tgt_mask[panel.patch] and not panel.ctx_mask[panel.patch]
    maps = np.stack(list(panel.maps.values()))
    assert np.all(maps.max(axis=(1, 2)) / maps.min(axis=(1, 2)) > 4)  # contrast at 0.1
  flat = heatmaps.heatmap_panels(compared, images[:1], temperature=1.0)[0]
  first = flat.maps[figures.run_label(run)]
  assert first.max() / first.min() < 2  # temperature 1: nearly uniform, as the issue found
  # softmax(c / 1) is softmax(c / 0.1) ** 0.1, renormalised: the temperature divides the cosines.
  expected = panels[0].maps[figures.run_label(run)] ** 0.1
  np.testing.assert_allclose(first, expected / expected.sum(), rtol=1e-4)


def test_compared_runs_refuse_another_resolution():
  run = runs.Run('stop_run', _tiny(), 30, {}, {})
  bigger = _tiny(**{'model.image_size': 64, 'stop.mode': 'off'})
  baseline = runs.Run('ijepa_run', bigger, 20, {}, {})
  assert figures.run_label(run) == 'StoP (sigma=0.25), step 30'
  with pytest.raises(figures.FiguresError, match='ijepa_run has 64px images on a .16, 16. patch'):
    figures.compared_runs(run, baseline)
  same = runs.Run('ijepa_run', _tiny(**{'stop.mode': 'off'}), 20, {}, {})
  assert list(figures.compared_runs(run, same)) == [
    'StoP (sigma=0.25), step 30',
    'I-JEPA, step 20',
  ]


def test_write_figures_names_what_is_missing(tmp_path):
  def error(workdir, match, **kwargs):
    with pytest.raises(figures.FiguresError, match=match):
      figures.write_figures(str(workdir), str(tmp_path / 'out'), **kwargs)

  error(tmp_path / 'none', 'does not exist')
  (tmp_path / 'empty').mkdir()
  error(tmp_path / 'empty', 'has no config.json')
  _write_run(tmp_path / 'untrained', 0.25, [])
  (tmp_path / 'untrained' / 'checkpoints').mkdir()
  error(tmp_path / 'untrained', 'has no checkpoint in .*checkpoints: train it first')
  error(tmp_path / 'untrained', r'--temperature=0 is not allowed', temperature=0)
  error(tmp_path / 'untrained', r'--num_images=0 is not allowed', num_images=0)
  assert not (tmp_path / 'out').exists()


def test_prediction_inputs_are_checked():
  run = runs.Run('unsaved', _tiny(), 0, {}, {})  # no params: the checks come before the model
  image = np.zeros((32, 32, 3), np.float32)
  ctx, tgt = heatmaps.sample_target_mask(run.config, seed=1)
  with pytest.raises(ValueError, match='not in the target block'):
    heatmaps.prediction_heatmaps(run, image, ctx, tgt, [int(np.flatnonzero(ctx)[0])])
  with pytest.raises(ValueError, match='also in the context'):
    heatmaps.predict_masked_tokens(run, image, ctx | tgt, tgt)


def test_plot_prediction_heatmaps_axes():
  image = np.zeros((32, 32, 3), np.float32)
  ctx = np.zeros(64, bool)
  ctx[:20] = True
  tgt = np.zeros(64, bool)
  tgt[40:44] = True
  maps = {'a': np.full((8, 8), 1 / 64), 'b': np.eye(8) / 8}
  fig = heatmaps.plot_prediction_heatmaps(image, ctx, tgt, 41, maps)
  assert len(fig.axes) == 1 + 2 + 1  # masked image, two overlays, colour bar
  shown = fig.axes[0].images[0].get_array()
  np.testing.assert_allclose(shown[20, 4], heatmaps.TARGET_RGB)  # patch 40 is the target fill
  np.testing.assert_allclose(fig.axes[2].images[1].get_array(), maps['b'], rtol=1e-6)
  with pytest.raises(ValueError, match='no heatmap'):
    heatmaps.plot_prediction_heatmaps(image, ctx, tgt, 41, {})


# ---- Fig. 4 (regularisation.py) -------------------------------------------------------------


def test_metric_series_sorts_and_keeps_the_last_value_of_a_repeated_step(tmp_path):
  rows = [
    {'step': 5, 'A_norm': 1.0},
    {'step': 10, 'A_norm': 2.0},
    {'step': 10, 'A_norm': 2.5},  # a resumed run logs step 10 again
    {'step': 15, 'probe_pretrained/accuracy': 0.9},
  ]
  _write_run(tmp_path, 0.25, rows)
  read = regularisation.read_metrics(str(tmp_path))
  assert read == rows
  steps, values = regularisation.metric_series(read, 'A_norm')
  np.testing.assert_array_equal(steps, [5, 10])
  np.testing.assert_array_equal(values, [1.0, 2.5])
  with pytest.raises(KeyError, match='A_bias_norm'):
    regularisation.metric_series(read, 'A_bias_norm')
  with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
    regularisation.read_metrics(str(tmp_path / 'none'))


@pytest.fixture
def sigma_runs(tmp_path):
  runs = []
  for sigma, mode in ((0.5, 'masked'), (0.0, 'masked'), (0.25, 'masked'), (0.25, 'off')):
    rows = [{'step': s, 'A_norm': 10 * sigma + s, 'A_bias_norm': sigma + s / 10} for s in (5, 10)]
    runs.append(_write_run(tmp_path / f'{mode}_{sigma}', sigma, rows, mode))
  return runs


def test_fig4_against_sigma_only_when_the_runs_span_two_sigmas(sigma_runs):
  both = figures.regularisation_figures(sigma_runs)
  assert list(both) == ['fig4_training', 'fig4_sigma']
  assert len(both['fig4_training'].axes[0].lines) == 4  # one curve per run
  masked = both['fig4_sigma'].axes[0].lines[0]
  np.testing.assert_array_equal(masked.get_xdata(), [0.0, 0.25, 0.5])
  assert list(figures.regularisation_figures(sigma_runs[:1])) == ['fig4_training']


def test_metric_series_leaves_out_null_values(tmp_path):
  rows = [{'step': 5, 'loss': 1.0}, {'step': 10, 'loss': None}, {'step': 15, 'loss': 0.5}]
  steps, values = regularisation.metric_series(rows, 'loss')  # strict JSON: non-finite is null
  np.testing.assert_array_equal(steps, [5, 15])
  np.testing.assert_array_equal(values, [1.0, 0.5])


def test_regularisation_table_is_sorted_by_sigma(sigma_runs):
  table = regularisation.regularisation_table(sigma_runs)
  np.testing.assert_array_equal(table['sigma'], [0.0, 0.25, 0.25, 0.5])
  assert table['mode'] == ['masked', 'masked', 'off', 'masked']
  np.testing.assert_allclose(table['A_norm'], [10.0, 12.5, 12.5, 15.0])
  np.testing.assert_array_equal(table['step'], [10, 10, 10, 10])
  smoothed = regularisation.regularisation_table(sigma_runs, last=2)
  np.testing.assert_allclose(smoothed['A_bias_norm'], [0.75, 1.0, 1.0, 1.25])
  with pytest.raises(ValueError, match='no run'):
    regularisation.regularisation_table([])


def test_regularisation_plots(sigma_runs):
  table = regularisation.regularisation_table(sigma_runs)
  fig = regularisation.plot_regularisation(table)
  assert len(fig.axes) == 2
  masked = fig.axes[0].lines[0]  # one line per mode, masked first
  np.testing.assert_array_equal(masked.get_xdata(), [0.0, 0.25, 0.5])
  np.testing.assert_allclose(masked.get_ydata(), [10.0, 12.5, 15.0])
  assert len(fig.axes[1].lines) == 2
  curves = regularisation.plot_metric_curves(sigma_runs, keys=('A_norm', 'A_bias_norm', 'A_norm'))
  assert len(curves.axes) == 3 and len(curves.axes[0].lines) == 4
  np.testing.assert_array_equal(curves.axes[0].lines[0].get_xdata(), [5, 10])
