"""Collapse health: is the target encoder still telling images apart?

A JEPA run can collapse (every image mapped to nearly the same features) while its loss looks
fine: predicting a constant is easy. Two figures expose it during pretraining:
- `target_std` (a step metric, `train/step.py`): the std across the batch of the layer-normed
  target features, averaged over tokens and channels. Healthy runs keep it near its early value
  (a sizeable fraction of 1: each channel of a layer-normed token has unit spread over channels,
  and images differ); a collapsing run drives it towards 0.
- `health_rankme` (this module, every `eval.health_every_steps`): the effective rank (RankMe,
  Garrido et al., 2023) of the average-pooled target features of a fixed held-out batch: the
  exponential of the entropy of the normalised singular values, between 1 (all images on one
  direction: collapse) and min(N, D). The features are centred first: avg-pooled ViT features
  share a large mean direction that would otherwise dominate the spectrum and hide the rest. A
  falling RankMe is the earliest sign of dimensional collapse, even while `target_std` is large.
  `health_feature_std` is the across-image std of the same pooled features.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import ml_collections
import numpy as np

from stop_jax.data import probe_arrays
from stop_jax.eval import features

_EPS = 1e-7  # RankMe's epsilon on the normalised singular values


def rankme(feats: np.ndarray, centre: bool = False) -> float:
  """Effective rank of [N, D] features: exp(-sum_k p_k log p_k), p = s / ||s||_1 + eps, with s
  the singular values (of the features minus their mean over N when `centre`)."""
  x = np.asarray(feats, np.float64)
  if centre:
    x = x - x.mean(axis=0, keepdims=True)
  s = np.linalg.svd(x, compute_uv=False)
  p = s / max(np.sum(s), 1e-30) + _EPS
  return float(np.exp(-np.sum(p * np.log(p))))


@dataclasses.dataclass(frozen=True)
class HealthEvaluator:
  """RankMe and the across-image std of the avg-pooled target features of a fixed held-out
  batch (the first `eval.health_examples` of the probe's test split, un-augmented)."""

  config: ml_collections.ConfigDict
  every_steps: int
  name: str = 'health'
  _images: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def images(self) -> np.ndarray:
    if 'x' not in self._images:  # read once per run
      n = self.config.eval.health_examples
      self._images['x'] = probe_arrays.load_eval_arrays(self.config, 'test', n)[0]
    return self._images['x']

  def __call__(self, encoder: nn.Module, params) -> dict[str, dict[str, float]]:
    feats = features.encoder_features(encoder, params, self.images())  # [N, D]
    return {
      '': {
        'rankme': rankme(feats, centre=True),
        'feature_std': float(np.mean(np.std(feats, axis=0))),
      }
    }
