"""The evaluators of a pretraining run (chosen from config.eval) and the protocol table of
`python -m stop_jax.evaluate`, with the protocols run on a small random-init encoder."""

from __future__ import annotations

import dataclasses
import os

import jax
import pytest

from stop_jax import config as config_lib
from stop_jax.data import labelled
from stop_jax.eval import evaluators, features, knn
from tests.eval.conftest import WIDTH, init_params, small_encoder


def _tiny(**eval_keys):
  config = config_lib.load_config_file('tiny.py')
  for k, v in eval_keys.items():
    config.eval[k] = v
  return config


@pytest.mark.parametrize(
  'knn_every_steps, probe, expected',
  [
    (0, False, []),
    (0, True, [('probe', 0)]),
    (5, False, [('knn', 5)]),
    (5, True, [('knn', 5), ('probe', 0)]),
  ],
)
def test_for_training_picks_the_evaluators_of_the_config(knn_every_steps, probe, expected):
  # Health off here (tests/eval/test_health.py covers it).
  config = _tiny(knn_every_steps=knn_every_steps, probe=probe, health_every_steps=0)
  rng = jax.random.key(3)
  evs = evaluators.for_training(config, rng)
  assert [(ev.name, ev.every_steps) for ev in evs] == expected
  for ev in evs:
    assert callable(ev) and ev.config is config
  probes = [ev for ev in evs if ev.name == 'probe']
  if probes:
    assert probes[0].rng is rng  # the loop's probe key initialises the random-init encoder


def test_knn_evaluator_has_one_group(monkeypatch):
  seen = []

  def fake_knn_eval(config, encoder, params):
    seen.append((config, encoder, params))
    return {'knn_top1': 0.5, 'knn_top5': 0.9}

  monkeypatch.setattr(knn, 'knn_eval', fake_knn_eval)
  config = _tiny(knn_every_steps=2, probe=False, health_every_steps=0)
  (ev,) = evaluators.for_training(config, None)
  # Group '': the loop logs it under the prefix 'knn', i.e. 'knn/knn_top1' as before.
  assert ev('encoder', 'params') == {'': {'knn_top1': 0.5, 'knn_top5': 0.9}}
  assert seen == [(config, 'encoder', 'params')]


@pytest.mark.parametrize('random_init', [True, False])
def test_probe_evaluator_groups(random_init):
  encoder = small_encoder(depth=1)  # one block: cheap to compile
  params = init_params(encoder)
  config = _tiny(probe_max_examples=150, probe_l2=(1e-2,), probe_random_init=random_init)
  config.model.image_size = 16  # the small encoder's resolution
  ev = evaluators.ProbeEvaluator(config, jax.random.key(1))
  results = ev(encoder, params)
  assert set(results) == ({'pretrained', 'random_init'} if random_init else {'pretrained'})
  for res in results.values():
    assert (res['num_train'], res['num_test'], res['dim']) == (150, 150, WIDTH)
    assert 0.1 < res['accuracy'] <= 1.0  # even random features carry the digit
  if random_init:  # another encoder: other features, another fit
    assert results['random_init']['train_accuracy'] != results['pretrained']['train_accuracy']


def test_protocol_table_covers_every_allowed_protocol():
  assert set(evaluators.PROTOCOLS) == set(config_lib.EVAL_PROTOCOLS)
  assert all(callable(run) for run in evaluators.PROTOCOLS.values())


def _task(protocol, cache_dir=None, **eval_keys):
  config = config_lib.load_config_file('eval/tiny.py', f'protocol={protocol}')
  config.model.image_size, config.model.patch_size = 16, 4
  for k, v in eval_keys.items():
    config.eval[k] = v
  spec = lambda split, n: labelled.EvalData(  # noqa: E731
    'digits', split=split, image_size=16, resize_ratio=1.0, max_examples=n
  )
  return evaluators.EvalTask(
    config,
    spec('train', 200),
    spec('test', 100),
    ('last', 'last4'),
    cache_dir,
    {'source': 'export', 'path': '/somewhere', 'step': 1},
  )


def test_knn_and_logreg_share_cached_features(encoder_and_params, tmp_path, monkeypatch):
  encoder, params = encoder_and_params
  cache = str(tmp_path / 'cache')
  task = _task('knn', cache, knn_k=5)
  results, extra = evaluators.PROTOCOLS['knn'](task, encoder, params)
  assert extra == {} and set(results) == {'last', 'last4'}
  assert all(
    r['num_train'] == 200 and r['num_test'] == 100 and r['k'] == 5 for r in results.values()
  )
  assert len(os.listdir(cache)) == 4  # {train, test} x {last, last4}

  # logreg on the same encoder and data: the features come from the cache.
  def no_extraction(*args, **kwargs):
    raise AssertionError('features were recomputed')

  monkeypatch.setattr(features, 'FeatureExtractor', no_extraction)
  results, extra = evaluators.PROTOCOLS['logreg'](
    _task('logreg', cache, probe_l2=(1e-2,)), encoder, params
  )
  assert extra == {} and len(os.listdir(cache)) == 4
  for r in results.values():
    assert r['top1'] == r['accuracy'] and r['l2'] == 1e-2 and r['num_test'] == 100


def test_cache_key_names_the_params(encoder_and_params, tmp_path):
  encoder, params = encoder_and_params
  task = dataclasses.replace(_task('knn', str(tmp_path)), feature_types=('last',))
  evaluators.split_features(task, encoder, params, task.test, features.params_fingerprint(params))
  other = jax.tree.map(lambda x: x + 1e-3, params)
  evaluators.split_features(task, encoder, other, task.test, features.params_fingerprint(other))
  assert len(os.listdir(tmp_path)) == 2  # other weights, same path and step: another entry


def test_linear_protocol_puts_its_heads_in_the_record(encoder_and_params, monkeypatch):
  encoder, params = encoder_and_params
  task = _task('linear')
  calls = []

  def fake_linear_eval(config, enc, p, train, test, feature_types):
    calls.append((train, test, feature_types))
    return {'last': {'top1': 0.5}, 'last4': {'top1': 0.6}, 'heads': {'h': {}}, 'steps': 3}

  monkeypatch.setattr(evaluators.linear, 'linear_eval', fake_linear_eval)
  results, extra = evaluators.PROTOCOLS['linear'](task, encoder, params)
  assert results == {'last': {'top1': 0.5}, 'last4': {'top1': 0.6}}
  assert extra == {'heads': {'h': {}}, 'steps': 3}
  assert calls == [(task.train, task.test, ('last', 'last4'))]
