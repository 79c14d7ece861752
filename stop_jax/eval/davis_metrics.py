"""The DAVIS 2017 semi-supervised scores: J (region IoU) and F (boundary F-measure).

Written after the davisvideochallenge/davis2017-evaluation package, whose figures are the
papers' (Table 3): per object k = 1..K of a video (K = the largest label of the first frame's
mask) and per frame, the first and last frames excluded (the first is given, the last has no
successor in the 2017 protocol):

- J: |pred ∩ gt| / |pred ∪ gt| over non-void pixels; 1 when both are empty.
- F: the F-measure of boundary precision and recall. Boundaries are davis2017's one-pixel maps
  (`boundary_map`); a boundary pixel matches when the other mask's boundary lies within a disk
  of radius ceil(bound_th * image diagonal) (8 pixels at 854x480).
- Per object: mean, recall (share of frames above 0.5) and decay (mean of the first quarter of
  frames minus that of the last), davis2017's `db_statistics`. J-Mean, F-Mean etc. average over
  all objects of all videos; J&F-Mean is (J-Mean + F-Mean) / 2.

Void pixels (255) are left out of both scores (davis2017's `db_eval_iou` / `f_measure` take a
void mask for this). Its reader, though, turns 255 into background before it builds that mask,
so there void counts as background; the two agree on masks without void.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

VOID = 255
STATS = ('Mean', 'Recall', 'Decay')


def region_similarity(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None):
  """J per mask: bool [..., H, W] each -> float64 [...] (1 where gt and pred are both empty)."""
  keep = np.ones_like(gt, bool) if void is None else ~void
  inter = np.sum(gt & pred & keep, axis=(-2, -1))
  union = np.sum((gt | pred) & keep, axis=(-2, -1))
  return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def boundary_map(mask: np.ndarray) -> np.ndarray:
  """davis2017's one-pixel boundary of bool masks [..., H, W].

  A pixel is on the boundary when it differs from its right, lower or lower-right neighbour
  (past the image edge a neighbour is background), except that the last row compares with the
  right neighbour only, the last column with the lower one only, and the corner never counts.
  """
  east = np.zeros_like(mask)
  south = np.zeros_like(mask)
  diag = np.zeros_like(mask)
  east[..., :, :-1] = mask[..., :, 1:]
  south[..., :-1, :] = mask[..., 1:, :]
  diag[..., :-1, :-1] = mask[..., 1:, 1:]
  b = (mask ^ east) | (mask ^ south) | (mask ^ diag)
  b[..., -1, :] = mask[..., -1, :] ^ east[..., -1, :]
  b[..., :, -1] = mask[..., :, -1] ^ south[..., :, -1]
  b[..., -1, -1] = False
  return b


def disk(radius: int) -> np.ndarray:
  """bool [2r + 1, 2r + 1]: x^2 + y^2 <= r^2 (skimage.morphology.disk, which davis2017 uses)."""
  y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
  return x * x + y * y <= radius * radius


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """Each [H, W] plane of bool [..., H, W] dilated by `disk(radius)` (cv2.dilate in davis2017).

  A pixel is in the dilation when a mask pixel of its plane lies within Euclidean distance
  radius: one exact distance transform over all planes, spaced radius + 1 apart so that no
  plane reaches another, instead of a per-pixel loop over the disk's (2r + 1)^2 offsets.
  """
  planes = mask.reshape(-1, *mask.shape[-2:])
  if not planes.any():
    return np.zeros_like(mask)
  dist = ndimage.distance_transform_edt(~planes, sampling=(radius + 1.0, 1.0, 1.0))
  return (dist <= radius).reshape(mask.shape)


def tolerance_pixels(shape: tuple[int, int], bound_th: float = 0.008) -> int:
  """F's match radius: bound_th pixels when >= 1, else ceil(bound_th * diagonal)."""
  return int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape)))


def boundary_f(gt: np.ndarray, pred: np.ndarray, void=None, bound_th: float = 0.008):
  """F per mask: bool [..., H, W] each -> float64 [...].

  Precision: share of pred's boundary pixels within the tolerance of gt's boundary; recall the
  other way round. An empty boundary: precision (or recall) 1 when the other one is empty too,
  else precision 1 / recall 0 (pred empty) or precision 0 / recall 1 (gt empty), as davis2017.
  """
  if void is not None:
    gt, pred = gt & ~void, pred & ~void
  gt_b, pred_b = boundary_map(gt), boundary_map(pred)
  radius = tolerance_pixels(gt.shape[-2:], bound_th)
  gt_dil, pred_dil = dilate(gt_b, radius), dilate(pred_b, radius)
  n_pred = pred_b.sum(axis=(-2, -1)).astype(np.float64)
  n_gt = gt_b.sum(axis=(-2, -1)).astype(np.float64)
  precision = np.where(
    n_pred > 0, (pred_b & gt_dil).sum(axis=(-2, -1)) / np.maximum(n_pred, 1), 1.0
  )
  recall = np.where(n_gt > 0, (gt_b & pred_dil).sum(axis=(-2, -1)) / np.maximum(n_gt, 1), 1.0)
  precision = np.where((n_pred > 0) & (n_gt == 0), 0.0, precision)
  recall = np.where((n_pred == 0) & (n_gt > 0), 0.0, recall)
  total = precision + recall
  return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)


def video_scores(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008):
  """J and F of one video, each float64 [K, T - 2] (objects x frames 1..T-2).

  Args:
    gt: uint8 [T, H, W] ground-truth labels (0 background, 1..K, 255 void).
    pred: uint8 [T, H, W] predicted labels.
    bound_th: F's tolerance (`tolerance_pixels`).
  """
  if gt.shape != pred.shape:
    raise ValueError(f'prediction {pred.shape} and ground truth {gt.shape} differ in shape.')
  if len(gt) < 3:
    raise ValueError(
      f'a video needs >= 3 frames to be scored (first and last excluded): {len(gt)}.'
    )
  num_objects = int(np.where(gt[0] == VOID, 0, gt[0]).max())
  gt, pred = gt[1:-1], pred[1:-1]
  void = gt == VOID
  j = np.zeros((num_objects, len(gt)))
  f = np.zeros((num_objects, len(gt)))
  for k in range(num_objects):  # one object at a time: [T - 2, H, W] masks, not K times that
    gt_k, pred_k = gt == k + 1, pred == k + 1
    j[k] = region_similarity(gt_k, pred_k, void)
    f[k] = boundary_f(gt_k, pred_k, void, bound_th)
  return j, f


def statistics(per_frame: np.ndarray) -> dict[str, float]:
  """davis2017's `db_statistics` of one object's per-frame scores: Mean, Recall, Decay.

  Decay: the frames are cut into 4 overlapping bins at round(linspace(1, T, 5)) - 1 (each bin
  includes its right edge); decay = mean of the first bin - mean of the last.
  """
  v = np.asarray(per_frame, np.float64)
  edges = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
  bins = [v[edges[i] : edges[i + 1] + 1] for i in range(4)]
  return {
    'Mean': float(np.nanmean(v)),
    'Recall': float(np.nanmean(v > 0.5)),
    'Decay': float(np.nanmean(bins[0]) - np.nanmean(bins[3])),
  }


def summarize(scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
  """The global scores and the per-object table of many videos.

  Args:
    scores: {video name: (J [K, T - 2], F [K, T - 2])} (`video_scores`).
  Returns:
    {'J&F-Mean', 'J-Mean', 'J-Recall', 'J-Decay', 'F-Mean', 'F-Recall', 'F-Decay': float,
     'per_object': [{'object': '<video>_<k>', 'J&F-Mean', 'J-Mean', 'F-Mean'}],
     'per_sequence': [{'sequence', 'objects', 'J&F-Mean', 'J-Mean', 'F-Mean'}]}.
  """
  stats = {'J': [], 'F': []}
  per_object, per_sequence = [], []
  for name, (j, f) in scores.items():
    rows = []
    for k in range(len(j)):
      sj, sf = statistics(j[k]), statistics(f[k])
      stats['J'].append(sj)
      stats['F'].append(sf)
      rows.append(_row(sj['Mean'], sf['Mean'], object=f'{name}_{k + 1}'))
    per_object += rows
    if rows:
      jm = float(np.mean([r['J-Mean'] for r in rows]))
      fm = float(np.mean([r['F-Mean'] for r in rows]))
      per_sequence.append(_row(jm, fm, sequence=name, objects=len(rows)))
  if not stats['J']:
    raise ValueError('no object to score: every first-frame mask is empty.')
  out = {}
  for metric in ('J', 'F'):
    for s in STATS:
      out[f'{metric}-{s}'] = float(np.mean([x[s] for x in stats[metric]]))
  out = {'J&F-Mean': (out['J-Mean'] + out['F-Mean']) / 2, **out}
  return {**out, 'per_object': per_object, 'per_sequence': per_sequence}


def _row(j_mean: float, f_mean: float, **names) -> dict:
  return {**names, 'J&F-Mean': (j_mean + f_mean) / 2, 'J-Mean': j_mean, 'F-Mean': f_mean}


GLOBAL_COLUMNS = ('J&F-Mean', 'J-Mean', 'J-Recall', 'J-Decay', 'F-Mean', 'F-Recall', 'F-Decay')


def markdown(summary: dict, title: str = '') -> str:
  """The global row, then one row per sequence and per object, as markdown tables (x100)."""

  def pct(x):
    return f'{100 * x:.1f}'

  lines = [f'## {title}', ''] if title else []
  lines += ['| ' + ' | '.join(GLOBAL_COLUMNS) + ' |', '|' + '---|' * len(GLOBAL_COLUMNS)]
  lines += ['| ' + ' | '.join(pct(summary[c]) for c in GLOBAL_COLUMNS) + ' |', '']
  for key, label in (('per_sequence', 'sequence'), ('per_object', 'object')):
    lines += [f'| {label} | J&F-Mean | J-Mean | F-Mean |', '|---|---|---|---|']
    for r in summary[key]:
      lines.append(
        f'| {r[label]} | {pct(r["J&F-Mean"])} | {pct(r["J-Mean"])} | {pct(r["F-Mean"])} |'
      )
    lines.append('')
  return '\n'.join(lines)
