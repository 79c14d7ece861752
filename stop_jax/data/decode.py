"""Encoded images (tfds records, folder files) to pixels, and corrupt files that never stop a run.

`safely_interleave` maps each element with a function that may fail (a truncated JPEG, garbage
behind an image header) and gives exactly one output per input, in order: the function's result
and True, or a fallback and False. The streams log and report the False ones.
"""

from __future__ import annotations

import tensorflow as tf

from stop_jax.data import augment


def decode_crop(data, u, size: int, scale, ratio, method: str) -> tf.Tensor:
  """Encoded image bytes -> RandomResizedCrop float32 [size, size, 3] in 0..255 (unclipped).

  u: the example's crop draws (see `augment.crop_draws`). JPEGs are decoded only inside the crop
  window (most of the decoding work saved); PNG, GIF and BMP are decoded whole and then cropped.
  Raises (inside tf.data) on undecodable data. The uint8 crop is resized directly, and scaled to
  [0, 1] later in the fused batch step.
  """

  def jpeg():
    shape = tf.image.extract_jpeg_shape(data)
    window = augment.crop_windows(u, shape[0], shape[1], scale, ratio)
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = tf.unstack(augment.crop_windows(u, shape[0], shape[1], scale, ratio))
    return image[y : y + h, x : x + w, :]

  crop = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  return tf.image.resize(crop, [size, size], method=method, antialias=True)


def decode_full(data) -> tf.Tensor:
  """Encoded image bytes (any of JPEG/PNG/GIF/BMP) -> uint8 [h, w, 3]."""
  return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)


def mean_image(size: int) -> tf.Tensor:
  """The fill (0..255) of an image that could not be decoded: normalises to 0."""
  return tf.broadcast_to(255.0 * tf.constant(augment.MEAN_RGB, tf.float32), [size, size, 3])


def _safely(fn, fallback, keep):
  """A tf.data interleave function: element -> (fn(*element), True, keep(*element)).

  If fn raises, (fallback, False, keep(*element)) takes its place. Errors cannot be caught inside
  a TF graph; a one-element dataset per example can drop its element with ignore_errors, and the
  fallback then follows. So exactly one output comes for every input, in order (interleave with
  block_length 1 and a deterministic order).
  """

  def one(*element):
    kept = keep(*element)
    good = tf.data.Dataset.from_tensors(element).map(lambda *e: (fn(*e), True)).ignore_errors()
    bad = tf.data.Dataset.from_tensors((fallback, False))
    return good.concatenate(bad).take(1).map(lambda out, ok: (out, ok, kept))

  return one


def safely_interleave(ds, fn, fallback, keep) -> tf.data.Dataset:
  """ds's elements e -> (fn(*e), ok, keep(*e)), with fallback where fn raised (ok=False)."""
  return ds.interleave(
    _safely(fn, fallback, keep),
    cycle_length=tf.data.AUTOTUNE,
    block_length=1,
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
