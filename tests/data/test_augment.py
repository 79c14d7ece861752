"""Augmentations: torchvision's crop windows, blur, colour jitter and grayscale, their switches in
the stream, and the labelled-data transforms (eval center crop, linear-probe crop and flip)."""

import colorsys
import math
import random

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from stop_jax.data import augment
from tests.data.conftest import batches, pixels, small_config


def _torchvision_window(u, height, width, scale, ratio):
  """torchvision's RandomResizedCrop.get_params, fed with the given uniforms."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for a in range(10):
    target = area * (scale[0] + (scale[1] - scale[0]) * u[a])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[10 + a])
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      return [math.floor(u[20] * (height - h + 1)), math.floor(u[21] * (width - w + 1)), h, w]
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    h, w = height, round(height * max(ratio))
  else:
    w, h = width, height
  return [(height - h) // 2, (width - w) // 2, h, w]


@pytest.mark.parametrize(
  'scale, ratio', [((0.3, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (2.5, 3.0)), ((0.08, 1.0), (0.5, 2))]
)
def test_crop_windows_follow_torchvision(scale, ratio):
  rng = np.random.default_rng(0)
  shapes = [(32, 32), (375, 500), (500, 120), (40, 300), (7, 9)]
  u = rng.random((200, augment._NUM_U)).astype(np.float32)
  hw = np.asarray([random.Random(i).choice(shapes) for i in range(200)])
  got = augment.crop_windows(tf.constant(u), hw[:, 0], hw[:, 1], scale, ratio).numpy()
  want = [_torchvision_window(u[i].astype(np.float64), *hw[i], scale, ratio) for i in range(200)]
  # float32 vs float64 can flip a rounding at a .5 boundary: allow a rare off-by-one.
  assert (np.abs(got - np.asarray(want)) <= 1).all()
  assert (got == np.asarray(want)).all(1).mean() > 0.97
  assert (got[:, :2] >= 0).all() and (got[:, :2] + got[:, 2:] <= hw).all()


@pytest.mark.slow
def test_grayscale_probability_and_equal_channels():
  def gray_rows(p):
    config = small_config('synthetic', batch=200, grayscale_prob=p, blur_prob=0.0, flip=False)
    p = pixels(batches(config, 1)[0]['image'])
    equal = np.abs(p - p[..., :1]).max(axis=(1, 2, 3)) < 1e-5
    return equal, p

  always, _ = gray_rows(1.0)
  never, colour = gray_rows(0.0)
  some, mixed = gray_rows(0.3)
  assert always.all() and not never.any()
  assert 0.2 < some.mean() < 0.4
  # The other rows are untouched: the same crops as without grayscale.
  np.testing.assert_allclose(mixed[~some], colour[~some], atol=1e-6)


def test_gaussian_blur_matches_scipy():
  rng = np.random.default_rng(0)
  images = rng.random((3, 20, 24, 3)).astype(np.float32)
  sigma = np.asarray([0.0, 0.7, 2.0], np.float32)
  got = augment._gaussian_blur(tf.constant(images), tf.constant(sigma), 6).numpy()
  np.testing.assert_array_equal(got[0], images[0])  # sigma 0: unchanged
  for i in (1, 2):
    # Edge pixels extended (mode='nearest'), the same 6-pixel radius.
    want = scipy.ndimage.gaussian_filter(
      images[i], sigma=(sigma[i], sigma[i], 0), mode='nearest', truncate=6 / sigma[i]
    )
    np.testing.assert_allclose(got[i], want, atol=1e-5)


def _jitter_reference(image, c, strength):
  """torchvision ColorJitter (tensor semantics) with the given draws, in numpy."""
  lo, hi = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
  factors = lo + (hi - lo) * c[1:4]
  hue = 0.2 * strength * (2 * c[4] - 1)
  gray = lambda x: (x * [0.299, 0.587, 0.114]).sum(-1, keepdims=True)  # noqa: E731
  blend = lambda x, ref, f: np.clip(f * x + (1 - f) * ref, 0, 1)  # noqa: E731
  for op in np.argsort(c[5:9]):
    if op == 0:
      image = blend(image, 0.0, factors[0])
    elif op == 1:
      image = blend(image, gray(image).mean(), factors[1])
    elif op == 2:
      image = blend(image, gray(image), factors[2])
    else:
      hsv = np.asarray([colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3)])
      hsv[:, 0] = (hsv[:, 0] + hue) % 1.0
      image = np.asarray([colorsys.hsv_to_rgb(*p) for p in hsv]).reshape(image.shape)
  return image


def test_colour_jitter_matches_torchvision_semantics():
  rng = np.random.default_rng(1)
  images = rng.random((8, 6, 7, 3)).astype(np.float32)
  c = rng.random((8, augment._NUM_C)).astype(np.float32)
  c[:, augment._C_JITTER] = [0.1] * 6 + [0.95, 0.99]  # p=0.8: the last two not jittered
  c[0, 5:9] = [0.9, 0.1, 0.5, 0.3]  # hue first...
  c[1, 5:9] = [0.1, 0.5, 0.3, 0.9]  # ...and last
  got = augment._colour_jitter(tf.constant(images), tf.constant(c), 1.0, 0.8).numpy()
  for i in range(6):
    np.testing.assert_allclose(got[i], _jitter_reference(images[i], c[i], 1.0), atol=2e-5)
    assert np.abs(got[i] - images[i]).max() > 0.01
  np.testing.assert_array_equal(got[6:], images[6:])


@pytest.mark.slow
def test_augmentation_switches_in_the_pipeline():
  def batch(**data):
    config = small_config('synthetic', batch=32, flip=False, grayscale_prob=0.0, **data)
    return pixels(batches(config, 1)[0]['image'])

  plain = batch(blur_prob=0.0)
  blurred = batch(blur_prob=1.0, blur_sigma=(1.5, 2.0))
  jittered = batch(blur_prob=0.0, color_jitter=1.0, color_jitter_prob=1.0)

  def tv(x):  # total variation per image
    return np.abs(np.diff(x, axis=1)).mean((1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean((1, 2, 3))

  assert (tv(blurred) < tv(plain)).all()  # every image smoother, same crops
  assert tv(blurred).mean() < 0.85 * tv(plain).mean()
  np.testing.assert_allclose(blurred.mean((1, 2)), plain.mean((1, 2)), atol=0.02)
  assert (np.abs(jittered - plain).max(axis=(1, 2, 3)) > 0.01).all()
  assert jittered.min() >= -1e-5 and jittered.max() <= 1 + 1e-5


def test_eval_transform_center_crop_and_whole_resize():
  # 40 x 80 image: left quarter 0, right quarter 1, middle 0.5.
  image = np.full((40, 80, 3), 0.5, np.float32)
  image[:, :20], image[:, 60:] = 0.0, 1.0
  mean, std = np.asarray(augment.MEAN_RGB), np.asarray(augment.STD_RGB)
  crop = augment.eval_transform(tf.constant(image), 32, 1.0).numpy() * std + mean
  assert crop.shape == (32, 32, 3)
  # Shorter side 40 -> 32 gives 32 x 64, whose central 32 columns are source columns 20..60
  # (the antialiasing kernel blends the outermost output columns with their neighbours).
  np.testing.assert_allclose(crop[:, 1:-1], 0.5, atol=1e-3)
  assert crop[:, 0].mean() < 0.5 < crop[:, -1].mean()
  whole = augment.eval_transform(tf.constant(image), 32, 1.0, center_crop=False).numpy()
  whole = whole * std + mean
  np.testing.assert_allclose(whole[:, 0], 0.0, atol=1e-3)
  np.testing.assert_allclose(whole[:, -1], 1.0, atol=1e-3)


def test_train_transform_flip_and_crop():
  image = np.zeros((32, 32, 3), np.float32)
  image[:, :8] = 1.0  # A bright left edge tells a mirrored output apart.
  outs = [
    augment.train_transform(
      tf.constant(image), tf.constant([0, s], tf.int64), 32, (1.0, 1.0), True
    ).numpy()
    for s in range(12)
  ]
  plain = augment.eval_transform(tf.constant(image), 32, 1.0, center_crop=False).numpy()
  mirrored = [np.allclose(o, plain[:, ::-1], atol=1e-5) for o in outs]
  same = [np.allclose(o, plain, atol=1e-5) for o in outs]
  assert all(m or s for m, s in zip(mirrored, same, strict=True))
  assert any(mirrored) and any(same)
  cropped = augment.train_transform(
    tf.constant(image), tf.constant([0, 1], tf.int64), 32, (0.08, 0.2), False
  ).numpy()
  assert not np.allclose(cropped, plain, atol=1e-2)  # a <=20% crop is a different picture
  assert cropped.shape == (32, 32, 3) and np.isfinite(cropped).all()
