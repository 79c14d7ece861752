"""Decoding: RandomResizedCrop of encoded images (as PIL), corrupt elements replaced in order."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from stop_jax.data import augment, decode


@pytest.mark.parametrize('method, pil_filter', [('bilinear', 'BILINEAR'), ('bicubic', 'BICUBIC')])
def test_random_resized_crop_resizes_like_pil(method, pil_filter):
  # A PNG decodes exactly in both libraries, so only the crop and the resize are compared.
  rng = np.random.default_rng(2)
  low = rng.random((1, 8, 10, 3)).astype(np.float32)
  smooth = tf.image.resize(low, [90, 120], method='bicubic')[0].numpy() * 255
  pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
  data = tf.io.encode_png(pixels).numpy()
  u = rng.random((4, augment._NUM_U)).astype(np.float32)
  scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
  for i in range(4):
    y, x, h, w = augment.crop_windows(tf.constant(u[i]), 90, 120, scale, ratio).numpy()
    got = decode.decode_crop(tf.constant(data), tf.constant(u[i]), 32, scale, ratio, method)
    got = np.clip(got.numpy(), 0, 255)
    crop = Image.open(io.BytesIO(data)).crop((x, y, x + w, y + h))
    want = np.asarray(crop.resize((32, 32), getattr(Image, pil_filter)), np.float32)
    other = 'BICUBIC' if pil_filter == 'BILINEAR' else 'BILINEAR'
    other = np.asarray(crop.resize((32, 32), getattr(Image, other)), np.float32)
    # PIL rounds to uint8; the other filter is clearly farther away.
    assert np.abs(got - want).mean() < 0.5 and np.abs(got - want).max() < 3.5
    assert np.abs(got - other).mean() > 2 * np.abs(got - want).mean()


def test_safely_interleave_keeps_order_and_replaces_failures():
  good = tf.io.encode_png(np.full((4, 6, 3), 7, np.uint8))
  data = tf.data.Dataset.from_tensor_slices([good, b'not an image', good])
  ds = decode.safely_interleave(
    data,
    lambda d: tf.cast(decode.decode_full(d), tf.float32),
    tf.fill([4, 6, 3], -1.0),
    lambda d: tf.strings.length(d),
  )
  out = list(ds.as_numpy_iterator())
  assert [bool(ok) for _, ok, _ in out] == [True, False, True]
  assert [int(n) for _, _, n in out] == [len(good.numpy()), 12, len(good.numpy())]
  np.testing.assert_array_equal(out[0][0], 7.0)
  np.testing.assert_array_equal(out[1][0], -1.0)
  mean = decode.mean_image(3).numpy() / 255.0
  np.testing.assert_allclose((mean - augment.MEAN_RGB) / augment.STD_RGB, 0.0, atol=1e-6)
