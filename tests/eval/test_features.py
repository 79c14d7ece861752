"""Pooled frozen-encoder features: shapes, the last-4 definition, padding, one batch in flight,
sharding over devices, the disk cache and the params fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax.eval import features
from tests.eval.conftest import DEPTH, WIDTH, random_images, small_encoder
from tests.subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_feature_shapes_and_last4_equals_truncated_encoders(encoder_and_params):
  enc, params = encoder_and_params
  images = random_images(10)
  # Batch 4 for 10 images: the last batch is padded, and padding must not leak into features.
  feats = features.extract_from_arrays(enc, params, images, batch_size=4)
  assert feats['last'].shape == (10, WIDTH)
  assert feats['last4'].shape == (10, 4 * WIDTH)
  assert feats['last'].dtype == np.float32

  # Independent definition: an encoder cut after block k (same params) ends in the final norm,
  # so its pooled output is "block k after the final norm"; last4 = blocks D-4..D-1 in order.
  manual = []
  for k in range(DEPTH - 3, DEPTH + 1):
    cut = {
      'patch_embed': params['patch_embed'],
      'norm': params['norm'],
      'blocks': {f'layers_{i}': params['blocks'][f'layers_{i}'] for i in range(k)},
    }
    out = small_encoder(depth=k).apply({'params': cut}, images)  # [10, N, D]
    manual.append(np.asarray(out).mean(axis=1))
  np.testing.assert_allclose(feats['last4'], np.concatenate(manual, axis=1), atol=2e-5)
  np.testing.assert_allclose(feats['last'], manual[-1], atol=2e-5)
  np.testing.assert_allclose(feats['last4'][:, -WIDTH:], feats['last'], atol=1e-6)

  # One batch of everything gives the same numbers as the padded batches.
  full = features.pooled_features(enc, params, jnp.asarray(images))
  np.testing.assert_allclose(feats['last4'], np.asarray(full['last4']), atol=1e-5)
  only_last = features.encoder_features(enc, params, images, batch_size=3)
  np.testing.assert_allclose(only_last, feats['last'], atol=1e-5)


def test_extractors_share_one_compilation(encoder_and_params):
  enc, params = encoder_and_params
  a = features.FeatureExtractor(enc, params, 4, ('last',))
  b = features.FeatureExtractor(enc, params, 4, ('last',))
  assert a._fn is b._fn  # a periodic k-NN does not recompile the encoder every time
  a(random_images(2))
  size = a._fn._cache_size()
  b(random_images(3))
  assert a._fn._cache_size() == size


def test_extraction_keeps_one_batch_in_flight(encoder_and_params):
  enc, params = encoder_and_params
  ex = features.FeatureExtractor(enc, params, 4, ('last',))
  images, events = random_images(10), []
  dispatch, fetch = ex.dispatch, ex.fetch

  def recording_dispatch(images, labels=None, valid=None):
    tag = sum(e.startswith('dispatch') for e in events)
    events.append(f'dispatch {tag}')
    return dispatch(images, labels, valid), tag

  def recording_fetch(tagged):
    out, tag = tagged
    events.append(f'fetch {tag}')
    return fetch(out)

  ex.dispatch, ex.fetch = recording_dispatch, recording_fetch
  batches = [{'image': images[i : i + 4], 'label': np.arange(i, min(i + 4, 10))} for i in (0, 4, 8)]
  feats, labels = features.extract_from_batches(ex, batches)
  # Batch i + 1 is on its way before batch i is waited for; the last one is fetched too.
  assert events == ['dispatch 0', 'dispatch 1', 'fetch 0', 'dispatch 2', 'fetch 1', 'fetch 2']
  np.testing.assert_array_equal(labels, np.arange(10))
  ex.dispatch, ex.fetch = dispatch, fetch
  one_by_one = np.concatenate([ex(b['image'])[0]['last'][: len(b['image'])] for b in batches])
  np.testing.assert_allclose(feats['last'], one_by_one, atol=1e-6)
  with pytest.raises(ValueError, match='no batches'):
    features.extract_from_batches(ex, [])


def test_feature_type_errors(encoder_and_params):
  enc, params = encoder_and_params
  with pytest.raises(ValueError, match="'last8' is not allowed"):
    features.pooled_features(enc, params, jnp.zeros((1, 16, 16, 3)), ('last8',))
  with pytest.raises(ValueError, match='depth >= 4'):
    features.check_feature_types(('last4',), depth=2)
  assert features.feature_dim('last4', 768) == 3072


_SHARDED_SCRIPT = textwrap.dedent(
  """
  import jax, numpy as np
  from tests.eval import conftest as t
  from stop_jax.eval import features
  assert jax.device_count() == 4, jax.devices()
  enc = t.small_encoder()
  params = t.init_params(enc)
  ex = features.FeatureExtractor(enc, params, 6)
  assert ex.global_batch == 8 and ex.batch_sharding.mesh.size == 4, ex.global_batch
  feats = features.extract_from_arrays(enc, params, t.random_images(10), batch_size=6)
  np.savez({out!r}, **feats)
  """
)


@pytest.mark.slow  # a fresh process with 4 devices
def test_sharded_extraction_equals_single_device(encoder_and_params, tmp_path):
  enc, params = encoder_and_params
  out = str(tmp_path / 'sharded.npz')
  env = cpu_env(4)
  script = _SHARDED_SCRIPT.format(out=out)
  proc = subprocess.run(
    [sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  single = features.extract_from_arrays(
    enc, params, random_images(10), batch_size=8, mesh=jax.make_mesh((1,), ('data',))
  )
  with np.load(out) as sharded:
    for t in ('last', 'last4'):
      np.testing.assert_allclose(sharded[t], single[t], rtol=1e-5, atol=1e-5)


def test_feature_cache_reuses_and_separates(tmp_path):
  calls = []

  def compute(types):
    calls.append(types)
    feats = {t: np.full((3, 2), float(len(calls)), np.float32) for t in types}
    return feats, np.arange(3, dtype=np.int32)

  key = {'model': {'step': 5}, 'data': {'split': 'train'}}
  first, labels = features.cached_features(str(tmp_path), key, ('last', 'last4'), compute)
  assert calls == [('last', 'last4')]
  again, labels2 = features.cached_features(str(tmp_path), key, ('last4', 'last'), compute)
  assert calls == [('last', 'last4')]  # Both read back, nothing recomputed.
  np.testing.assert_array_equal(again['last4'], first['last4'])
  np.testing.assert_array_equal(labels2, labels)
  other = {'model': {'step': 6}, 'data': {'split': 'train'}}
  features.cached_features(str(tmp_path), other, ('last',), compute)
  assert calls[-1] == ('last',)  # Another checkpoint step is another entry.
  assert len(os.listdir(tmp_path)) == 3
  # No cache dir: always computed.
  features.cached_features(None, key, ('last',), compute)
  assert len(calls) == 3


def test_params_fingerprint_sees_any_weight_change(encoder_and_params):
  _, params = encoder_and_params
  changed = jax.tree.map(lambda x: x, params)
  changed['norm']['scale'] = changed['norm']['scale'].at[0].add(1e-3)
  assert features.params_fingerprint(params) == features.params_fingerprint(params)
  assert features.params_fingerprint(params) != features.params_fingerprint(changed)
