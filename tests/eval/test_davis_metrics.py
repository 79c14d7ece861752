"""The DAVIS 2017 scores against hand-computed cases (davis_metrics)."""

import numpy as np
import pytest
from scipy import ndimage

from stop_jax.eval import davis_metrics as dm


def _square(top, left, side=10, shape=(40, 40)):
  m = np.zeros(shape, bool)
  m[top : top + side, left : left + side] = True
  return m


def test_identical_masks_give_j_and_f_of_one():
  gt = _square(10, 10)
  assert dm.region_similarity(gt, gt) == 1.0
  assert dm.boundary_f(gt, gt) == 1.0
  empty = np.zeros_like(gt)
  assert dm.region_similarity(empty, empty) == 1.0 and dm.boundary_f(empty, empty) == 1.0
  assert dm.boundary_f(gt, empty) == 0.0 and dm.boundary_f(empty, gt) == 0.0


def test_boundary_map_of_a_square_is_offset_half_a_pixel_towards_the_origin():
  b = dm.boundary_map(_square(10, 10))
  # Outside on the top and left (row 9, col 9), inside on the bottom and right (row 19, col 19).
  expected = np.zeros_like(b)
  expected[9, 9:20] = expected[9:20, 9] = True
  expected[19, 10:20] = expected[10:20, 19] = True
  np.testing.assert_array_equal(b, expected)
  assert b.sum() == 40


def test_a_square_shifted_by_two_pixels():
  gt, pred = _square(10, 10), _square(10, 12)
  # J: overlap 10 x 8 over union 10 x 12.
  assert dm.region_similarity(gt, pred) == pytest.approx(80 / 120)
  # F: tolerance ceil(0.008 * hypot(40, 40)) = 1 pixel (a plus-shaped disk). pred's boundary
  # (row 9 cols 11-21, col 11 rows 10-19, row 19 cols 12-21, col 21 rows 10-18): 22 of its 40
  # pixels lie within 1 pixel of gt's: row 9 cols 11-20 (10), col 11 rows 10, 18, 19 (next to
  # gt's rows 9 and 19), row 19 cols 12-20 (9); col 21 is 2 from gt's col 19. Recall mirrors it.
  assert dm.tolerance_pixels((40, 40)) == 1
  assert dm.boundary_f(gt, pred) == pytest.approx(22 / 40)
  # With a 2-pixel tolerance every boundary pixel is within 2 pixels of the other boundary.
  assert dm.boundary_f(gt, pred, bound_th=2) == pytest.approx(1.0)


def test_void_pixels_are_ignored():
  gt = _square(10, 10)
  pred = gt.copy()
  pred[30:36, 30:36] = True  # a false positive blob...
  void = np.zeros_like(gt)
  void[28:38, 28:38] = True  # ...entirely in a void region
  assert dm.region_similarity(gt, pred, void) == 1.0
  assert dm.boundary_f(gt, pred, void) == 1.0
  assert dm.region_similarity(gt, pred) == pytest.approx(100 / 136)
  assert dm.boundary_f(gt, pred) < 1.0


def test_video_scores_exclude_the_first_and_last_frames_and_void():
  gt = np.zeros((5, 40, 40), np.uint8)
  for t in range(5):
    gt[t][_square(5 + t, 5)] = 1
    gt[t][_square(20, 20 + t)] = 2
  gt[2, 0:3, :] = 255  # void rows
  pred = gt.copy()
  pred[2, 0:3, :] = 1  # predictions on void pixels count for nothing
  pred[0] = 0  # first and last frames: wrong, and not scored
  pred[4] = 2
  j, f = dm.video_scores(gt, pred)
  assert j.shape == f.shape == (2, 3)
  np.testing.assert_array_equal(j, 1.0)
  np.testing.assert_array_equal(f, 1.0)
  pred[1] = 0  # a middle frame: object 1 and 2 missed there
  j, f = dm.video_scores(gt, pred)
  np.testing.assert_array_equal(j[:, 0], 0.0)
  np.testing.assert_array_equal(j[:, 1:], 1.0)


def test_objects_are_counted_from_the_first_frame():
  gt = np.zeros((4, 20, 20), np.uint8)
  gt[:, 2:8, 2:8] = 3  # object ids 1 and 2 absent: J = 1 (both empty), F = 1
  j, f = dm.video_scores(gt, gt.copy())
  assert j.shape == (3, 2)


def test_dilation_equals_the_disk_dilation():
  rng = np.random.default_rng(0)
  m = rng.random((3, 30, 40)) < 0.02
  m[1] = False
  for r in (1, 4, 8):
    expected = np.stack([ndimage.binary_dilation(x, dm.disk(r)) for x in m])
    np.testing.assert_array_equal(dm.dilate(m, r), expected)
  assert dm.disk(1).sum() == 5 and dm.disk(2).sum() == 13


def test_statistics_mean_recall_decay():
  s = dm.statistics([1, 1, 1, 1, 0, 0, 0, 0])
  # Bins at round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7]: first [0..2] mean 1, last [5..7] 0.
  assert s == {'Mean': 0.5, 'Recall': 0.5, 'Decay': 1.0}
  assert dm.statistics([0.4, 0.6, 0.8])['Recall'] == pytest.approx(2 / 3)


def test_summarize_and_markdown():
  j1, f1 = np.array([[1.0, 1.0], [0.5, 0.5]]), np.array([[1.0, 1.0], [0.0, 0.0]])
  j2, f2 = np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]])
  s = dm.summarize({'a': (j1, f1), 'b': (j2, f2)})
  assert s['J-Mean'] == pytest.approx((1 + 0.5 + 0.5) / 3)
  assert s['F-Mean'] == pytest.approx((1 + 0 + 0.5) / 3)
  assert s['J&F-Mean'] == pytest.approx((s['J-Mean'] + s['F-Mean']) / 2)
  assert [r['object'] for r in s['per_object']] == ['a_1', 'a_2', 'b_1']
  assert s['per_sequence'][0] == {
    'sequence': 'a',
    'objects': 2,
    'J&F-Mean': pytest.approx(0.625),
    'J-Mean': 0.75,
    'F-Mean': 0.5,
  }
  text = dm.markdown(s, 'run')
  assert '| J&F-Mean | J-Mean |' in text and '| a_2 | 25.0 | 50.0 | 0.0 |' in text
