"""`python -m stop_jax.figures`: the paper's Figs. 4, 5 and 6 as PNG files, without a notebook.

The figures' builders are tested in tests/tools/test_analysis.py; here the command line itself:
its help, its one-line errors, and the files it writes for conftest's tiny run (given as its
own baseline, so Fig. 6 has two panels to compare).
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stop_jax.tools.analysis import heatmaps

REPO = pathlib.Path(__file__).resolve().parent.parent


def _figures(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'stop_jax.figures', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_help_exits_0_and_lists_the_flags():
  result = _figures('--help')
  assert result.returncode == 0, result.stderr
  for flag in ('--workdir', '--baseline_workdir', '--out', '--temperature', '--sigma_workdirs'):
    assert flag in result.stdout
  # The flag's default is the documented one of heatmaps.py (absl prints it quoted).
  assert f"(default: '{heatmaps.DEFAULT_TEMPERATURE}')" in result.stdout


def test_a_missing_workdir_is_one_error_line_and_exit_2(tmp_path):
  result = _figures(f'--workdir={tmp_path / "nope"}', f'--out={tmp_path / "out"}')
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors == [
    f'error: --workdir={tmp_path / "nope"} does not exist: pass the --workdir of a training run '
    '(python -m stop_jax.main --config=... --workdir=...).'
  ]
  assert not (tmp_path / 'out').exists()


def _png(path) -> np.ndarray:
  with Image.open(path) as image:
    assert image.format == 'PNG'
    return np.asarray(image.convert('RGB'))


@pytest.mark.slow
def test_figures_of_a_run_with_a_baseline_side_by_side(tiny_run, tmp_path):
  out = tmp_path / 'figures'
  result = _figures(
    f'--workdir={tiny_run}', f'--baseline_workdir={tiny_run}', f'--out={out}', '--num_images=2'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  expected = [
    'fig4_training.png',  # one run (given twice): no sigma axis, so no fig4_sigma.png
    'fig5_similarity.png',
    'fig6_heatmaps.npz',
    'fig6_heatmaps_0.png',
    'fig6_heatmaps_1.png',
  ]
  assert sorted(os.listdir(out)) == expected
  printed = ['fig4_training.png', 'fig5_similarity.png', 'fig6_heatmaps_0.png']
  printed += ['fig6_heatmaps_1.png', 'fig6_heatmaps.npz']
  assert result.stdout.split() == [str(out / name) for name in printed]
  shapes = {}
  for name in printed[:-1]:
    pixels = _png(out / name)
    shapes[name] = pixels.shape
    assert 300 <= pixels.shape[1] <= 4000 and 200 <= pixels.shape[0] <= 2000, (name, pixels.shape)
    assert pixels.std() > 10, name  # something is drawn
  # Fig. 5: 8 columns (learned and random A at 4 sigmas) by 3 query rows.
  height, width = shapes['fig5_similarity.png'][:2]
  assert width > 2 * height
  # Fig. 6: the masked image and two heatmap panels (run, baseline) in one row.
  height, width = shapes['fig6_heatmaps_0.png'][:2]
  assert width > 2.6 * height  # one heatmap panel alone is about 2x as wide as high

  saved = np.load(out / 'fig6_heatmaps.npz')
  assert list(saved['titles']) == [
    'StoP (sigma=0.25), step 30',
    'StoP (sigma=0.25), step 30 (baseline)',
  ]
  maps = saved['maps']  # [runs, images, h, w]
  assert maps.shape == (2, 2, 8, 8)
  np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(maps[0], maps[1])  # the same run twice, the same masks
  # Contrast: at temperature 1 these maps span about 1.3x (0.0145-0.0167 on a bigger run).
  ratio = maps.max(axis=(2, 3)) / maps.min(axis=(2, 3))
  assert np.all(ratio > 4), ratio
  for i, patch in enumerate(saved['patches']):
    assert saved['tgt_masks'][i, patch] and not saved['ctx_masks'][i, patch]
