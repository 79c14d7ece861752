"""Stateless keyed draws: fixed per key, independent across words, permutations are bijections."""

import numpy as np
import tensorflow as tf

from stop_jax.data import keys


def test_keys_are_fixed_and_fold_in_every_word():
  a = keys.make_key(keys.STREAM_ORDER, 0, 5).numpy()
  np.testing.assert_array_equal(a, keys.make_key(keys.STREAM_ORDER, 0, tf.constant(5, tf.int64)))
  others = [keys.make_key(*w).numpy() for w in ((keys.STREAM_AUGMENT, 0, 5), (1, 1, 5), (1, 0, 6))]
  assert all(not np.array_equal(a, o) for o in others)
  u = keys.uniform([1000], keys.make_key(1, 2), 2.0, 3.0).numpy()
  np.testing.assert_array_equal(u, keys.uniform([1000], keys.make_key(1, 2), 2.0, 3.0))
  assert u.min() >= 2.0 and u.max() < 3.0 and 2.4 < u.mean() < 2.6


def test_permute_is_a_keyed_bijection():
  key = keys.make_key(keys.STREAM_ORDER, 3)
  index = tf.range(37, dtype=tf.int64)
  perm = keys.permute(index, key, 0, 37).numpy()
  np.testing.assert_array_equal(np.sort(perm), np.arange(37))
  assert not np.array_equal(perm, np.arange(37))
  np.testing.assert_array_equal(perm, keys.permute(index, key, 0, 37))
  assert not np.array_equal(perm, keys.permute(index, key, 1, 37))  # another epoch
  # A word per element: element i permuted with word w_i, as with a scalar word.
  words = tf.constant([0] * 20 + [1] * 17, tf.int64)
  mixed = keys.permute(index, key, words, 37).numpy()
  np.testing.assert_array_equal(mixed[:20], perm[:20])
  np.testing.assert_array_equal(mixed[20:], keys.permute(index, key, 1, 37).numpy()[20:])
  assert keys.deterministic_options().deterministic
