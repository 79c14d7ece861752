"""Determinism of every data stream: stateless keyed random draws and deterministic tf.data.

No stream holds random state. Every draw is a stateless op whose key folds in what the draw
belongs to: an independent stream id (first word), the seed, and the step, row, example or epoch.
So a batch, a crop or an epoch's order is a pure function of its position and can be computed
directly (exact resume), whatever the number of processes or prefetched batches.

Importing this module keeps TensorFlow off the GPUs: every data module that runs TF imports it.
"""

from __future__ import annotations

import tensorflow as tf

# Independent random streams (the first word of every stateless key).
STREAM_ORDER = 1  # the order of the examples of an epoch
STREAM_AUGMENT = 2  # crop and flip draws of a step
STREAM_SYNTH_PIXELS = 3  # synthetic pretraining images
STREAM_SYNTH_LABELS = 4  # synthetic pretraining labels
STREAM_COLOUR = 5  # colour jitter, grayscale and blur draws of a step
STREAM_WINDOWS = 6  # tfds shuffle windows of an epoch


def _hide_gpus_from_tf():
  # TF would otherwise reserve GPU memory that JAX needs; the data streams only run on CPU.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    pass  # TF devices already initialised: nothing we can change any more.


_hide_gpus_from_tf()


def make_key(*words) -> tf.Tensor:
  """A stateless seed [2] int64 folding in every word (ints or int64 scalar tensors)."""
  key = tf.constant([0, 0], tf.int64)
  for w in words:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(w, tf.int64), alg='philox')
  return key


def uniform(shape, key, lo=0.0, hi=1.0, dtype=tf.float32) -> tf.Tensor:
  """Stateless uniform draws in [lo, hi) of the given shape, keyed on key [2]."""
  return tf.random.stateless_uniform(shape, key, minval=lo, maxval=hi, dtype=dtype, alg='philox')


def permute(index, key, word, size) -> tf.Tensor:
  """A bijection of [0, size) applied to index (int64 [n]), keyed on (key [2], word).

  word: int64 scalar or [n]. The raw op, since tf.random.experimental.index_shuffle mis-pads
  batched [n, 2] seeds (TF 2.21).
  """
  n = tf.shape(index)
  seed = tf.stack(
    [tf.fill(n, key[0]), tf.fill(n, key[1]), tf.broadcast_to(tf.cast(word, tf.int64), n)], axis=-1
  )
  size = tf.fill(n, tf.cast(size, tf.int64) - 1)
  return tf.raw_ops.RandomIndexShuffle(index=index, seed=seed, max_index=size, rounds=4)


def deterministic_options() -> tf.data.Options:
  """tf.data options under which parallel map/interleave keep their order (needed for resume)."""
  options = tf.data.Options()
  options.deterministic = True
  return options
