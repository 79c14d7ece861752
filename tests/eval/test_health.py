"""Collapse health: RankMe by hand, and a collapsed encoder against a trained one."""

import jax
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax import models
from stop_jax.eval import evaluators, health
from stop_jax.runtime import checkpointing


def test_rankme_counts_the_directions_the_features_use():
  # Orthogonal directions of equal energy: p_k = 1/4 each, rank exp(log 4) = 4.
  assert health.rankme(np.eye(4) * 3.0) == pytest.approx(4.0, rel=1e-5)
  # Every image on one direction (collapse): rank 1.
  one = np.outer(np.arange(1, 9), np.ones(16))
  assert health.rankme(one) == pytest.approx(1.0, abs=1e-4)
  # Singular values 3 and 1: p = (0.75, 0.25), rank exp(H) by hand.
  two = np.diag([3.0, 1.0])
  h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  assert health.rankme(two) == pytest.approx(np.exp(h), rel=1e-5)
  # Centred: a shared offset does not count as a direction.
  assert health.rankme(np.eye(4) * 3.0 + 100.0) < 2
  assert health.rankme(np.eye(4) * 3.0 + 100.0, centre=True) == pytest.approx(3.0, rel=1e-4)


def test_health_runs_every_log_step_by_default_and_can_be_off():
  c = config_lib.load_config_file('tiny.py')
  names = {ev.name: ev.every_steps for ev in evaluators.for_training(c, jax.random.key(0))}
  assert names['health'] == c.log_every_steps
  c.eval.health_every_steps = 0
  assert 'health' not in {ev.name for ev in evaluators.for_training(c, jax.random.key(0))}
  c.eval.health_every_steps = -2
  with pytest.raises(config_lib.ConfigError, match='eval.health_every_steps=-2'):
    config_lib.validate(c)


def test_a_collapsed_encoder_has_rank_one_and_no_spread_and_a_trained_one_does_not(tiny_run):
  config = config_lib.load_json(tiny_run)
  config.eval.health_examples = 64
  encoder = models.build_encoder(config)
  _, tree = checkpointing.load_checkpoint(tiny_run)
  trained = health.HealthEvaluator(config, every_steps=1)(encoder, tree['target_params'])['']
  assert trained['rankme'] > 3 and trained['feature_std'] > 1e-2
  # Every token made the same: zero patch embedding and position-independent blocks cannot
  # tell images apart, which is what a collapsed target encoder does.
  collapsed_params = jax.tree.map(np.zeros_like, tree['target_params'])
  collapsed = health.HealthEvaluator(config, every_steps=1)(encoder, collapsed_params)['']
  assert collapsed['rankme'] < 1.5 and collapsed['feature_std'] < 1e-6
