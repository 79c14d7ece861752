"""Training and probing data: one tf.data pipeline for digits, synthetic, tfds and image folders.

Every source goes through the same stages: pick the examples of a step, decode and crop them
(RandomResizedCrop), batch, augment the batch (flip, colour jitter, grayscale, Gaussian blur),
normalise with the ImageNet mean/std, then attach the step's masks (`masking.sample_masks`,
vectorised numpy). Nothing on the hot path runs Python per image.

Step-indexed, not iterator state. The batch at global step `s` is a pure function of
(config.seed, s, process): every random draw is a stateless op keyed on the step and the row of
the global batch, and the order of examples is computed, not accumulated. `create_train_iterator`
(start_step=k) therefore yields exactly the batches an uninterrupted run yields from step k, with
nothing to save in the checkpoint but the step, whatever the number of prefetched batches.

- digits / synthetic / folder (random access): example `p = s * global_batch + row` of the stream
  is item `perm_e[p % N]`, `e = p // N`, with `perm_e` a permutation keyed on (seed, e): a fresh
  full shuffle every epoch, any step computed directly (resume costs nothing). A row's image does
  not depend on the number of processes; each process reads only its rows of every batch.
- tfds (sequential TFRecord shards): each process reads its own `tfds.even_splits` shard of
  `n_p` examples through the split's file instructions. An epoch of that shard is cut into windows
  of `data.shuffle_window` consecutive records (the cut points move by a random offset every
  epoch); the windows are visited in a random order and each window is permuted in memory, all
  keyed on (seed, process, epoch). Restarting at step k reads from the window that holds the
  process's example `k * B_local`, which costs one window of raw reads whatever k is. tfds
  shuffles records when it prepares a dataset, so a window is a random subset of the split.

Augmentation follows StoP's official torchvision recipe (see `config_base`): RandomResizedCrop,
horizontal flip, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) in a random order applied with a probability,
RandomGrayscale, Gaussian blur (PIL `GaussianBlur(radius)`: radius is the standard deviation).
They run on float images in [0, 1] with torchvision's tensor semantics.

Corrupt or undecodable images (tfds and folder) never stop a run: the row is filled with another
image of the same batch (re-augmented with the row's own flip/colour/blur), the key is logged
with a warning and kept in `TrainIterator.corrupt`. Substituting rather than dropping keeps every
later batch where the step index says it is, so resume stays exact.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import textwrap
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from stop_jax import config as config_lib
from stop_jax.data import batch as batch_lib
from stop_jax.data import masking

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)

SYNTHETIC_NUM_EXAMPLES = 1_281_167  # ImageNet-1k train, so schedules look like the real thing.
SYNTHETIC_NUM_CLASSES = 1000
EVAL_RESIZE_RATIO = 256 / 224  # Resize the shorter side to image_size * 256/224, then crop.
# Files an image folder may hold (matched case-insensitively; ImageNet's are `.JPEG`).
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif')
_RRC_ATTEMPTS = 10  # As torchvision: fall back to a center crop after this many misses.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert('L').
_WINDOWS_IN_FLIGHT = 2  # tfds windows read concurrently: the next one loads while one is used.
_TFRECORD_BUFFER = 8 << 20  # Read-ahead per shard file (large reads suit network filesystems).
_NEVER = 2**62  # Upper end of the "infinite" step and epoch ranges.

# Independent random streams (first word of every stateless key).
_STREAM_ORDER, _STREAM_AUGMENT, _STREAM_SYNTH_PIXELS, _STREAM_SYNTH_LABELS = 1, 2, 3, 4
_STREAM_COLOUR, _STREAM_WINDOWS = 5, 6


class DatasetNotReadyError(RuntimeError):
  """The dataset is not prepared, empty or unknown; the message says how to prepare it."""


def _hide_gpus_from_tf():
  # TF would otherwise reserve GPU memory that JAX needs; the pipeline only runs on CPU.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    pass  # TF devices already initialised: nothing we can change any more.


_hide_gpus_from_tf()


def _key(*words) -> tf.Tensor:
  """A stateless seed [2] int64 folding in every word (ints or int64 scalar tensors)."""
  key = tf.constant([0, 0], tf.int64)
  for w in words:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(w, tf.int64), alg='philox')
  return key


def _uniform(shape, key, lo=0.0, hi=1.0, dtype=tf.float32):
  return tf.random.stateless_uniform(shape, key, minval=lo, maxval=hi, dtype=dtype, alg='philox')


def _permute(index, key, word, size) -> tf.Tensor:
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


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel map/interleave must keep their order for resume.
  return options


# ---------------------------------------------------------------------------------------------
# Augmentation.

# Columns of an example's crop draws: the crop attempts' scales and log-ratios, the crop
# offsets, the flip.
_U_SCALE = slice(0, _RRC_ATTEMPTS)
_U_RATIO = slice(_RRC_ATTEMPTS, 2 * _RRC_ATTEMPTS)
_U_Y, _U_X, _U_FLIP = 2 * _RRC_ATTEMPTS, 2 * _RRC_ATTEMPTS + 1, 2 * _RRC_ATTEMPTS + 2
_NUM_U = 2 * _RRC_ATTEMPTS + 3

# Columns of an example's colour draws: jitter on/off, the brightness, contrast, saturation and
# hue factors, four keys whose argsort is the order of the jitter ops, grayscale, blur, sigma.
_C_JITTER, _C_FACTORS, _C_HUE = 0, slice(1, 4), 4
_C_ORDER = slice(5, 9)
_C_GRAY, _C_BLUR, _C_SIGMA = 9, 10, 11
_NUM_C = 12


def _step_draws(config, step, row0: int, b_local: int) -> tf.Tensor:
  """Crop/flip uniforms float32 [B_local, NUM_U] for this process's rows of the batch at `step`.

  They are rows of one [global_batch, NUM_U] draw keyed on (seed, step): a row gets the same
  augmentation whatever the number of processes.
  """
  key = _key(_STREAM_AUGMENT, config.seed, step)
  return _uniform([config.data.global_batch_size, _NUM_U], key)[row0 : row0 + b_local]


def _colour_draws(config, step, row0: int, b_local: int) -> tf.Tensor:
  """Colour/blur uniforms float32 [B_local, NUM_C] of this process's rows at `step`."""
  key = _key(_STREAM_COLOUR, config.seed, step)
  return _uniform([config.data.global_batch_size, _NUM_C], key)[row0 : row0 + b_local]


def _crop_windows(u, height, width, scale, ratio) -> tf.Tensor:
  """torchvision RandomResizedCrop.get_params with all its attempts at once, batched.

  u: float [..., NUM_U]; height, width: int [...] (or scalars). Returns int32 [..., 4] with
  (y, x, h, w) of each crop. The first attempt that fits wins; if none of the 10 fits, the
  center crop of the whole image clamped to the ratio range, as torchvision.
  """
  ones = tf.ones_like(u[..., 0])
  h_in = tf.cast(height, tf.float32) * ones  # [...]
  w_in = tf.cast(width, tf.float32) * ones
  area = (h_in * w_in)[..., None] * (scale[0] + (scale[1] - scale[0]) * u[..., _U_SCALE])
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(lo + (hi - lo) * u[..., _U_RATIO])  # Log-uniform, as torchvision.
  # tf.round rounds half to even, like Python's round() in torchvision.
  cand_w = tf.round(tf.sqrt(area * aspect))  # [..., attempts]
  cand_h = tf.round(tf.sqrt(area / aspect))
  ok = (cand_w > 0) & (cand_w <= w_in[..., None]) & (cand_h > 0) & (cand_h <= h_in[..., None])
  n = _RRC_ATTEMPTS
  first = tf.reduce_min(tf.where(ok, tf.range(n), n), axis=-1)  # argmax leaves ties unspecified
  chosen = tf.one_hot(first, n, on_value=True, off_value=False)  # all False when none fits
  found = first < n
  in_ratio = w_in / h_in
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h_in * ratio[1]), w_in)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w_in / ratio[0]), h_in)
  h = tf.where(found, tf.reduce_sum(tf.where(chosen, cand_h, 0.0), axis=-1), fb_h)
  w = tf.where(found, tf.reduce_sum(tf.where(chosen, cand_w, 0.0), axis=-1), fb_w)
  # Uniform integer offsets in [0, room], i.e. torch.randint(0, room + 1).
  room_h, room_w = h_in - h, w_in - w
  y = tf.where(found, tf.minimum(tf.floor(u[..., _U_Y] * (room_h + 1)), room_h), room_h // 2)
  x = tf.where(found, tf.minimum(tf.floor(u[..., _U_X] * (room_w + 1)), room_w), room_w // 2)
  return tf.cast(tf.stack([y, x, h, w], axis=-1), tf.int32)


def _resize(image, size, method: str, antialias: bool) -> tf.Tensor:
  """[h, w, 3] -> float32 [size, size, 3] (or [*size, 3] for a pair) in [0, 1].

  uint8 input is scaled by 1/255 after resizing, which skips a float copy of the larger crop.
  Clipped since bicubic overshoots.
  """
  scale = 1.0 / 255.0 if image.dtype == tf.uint8 else 1.0
  hw = [size, size] if isinstance(size, int) else size
  image = tf.image.resize(image, hw, method=method, antialias=antialias)
  return tf.clip_by_value(image * scale, 0.0, 1.0)


def _crop_resize(image, window, size: int, method: str, antialias: bool) -> tf.Tensor:
  """The crop (y, x, h, w) of image [H, W, 3] resized to [size, size, 3]."""
  y, x, h, w = tf.unstack(window)
  return _resize(image[y : y + h, x : x + w, :], size, method, antialias)


def _normalise(images) -> tf.Tensor:
  return (images - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


def _grayscale(images) -> tf.Tensor:
  """float [..., 3] -> [..., 1] luma."""
  return tf.reduce_sum(images * tf.constant(_GRAY_WEIGHTS), axis=-1, keepdims=True)


def _rows(mask) -> tf.Tensor:
  return mask[:, None, None, None]  # [B] -> [B, 1, 1, 1], to select whole images


def _flip(images, u) -> tf.Tensor:
  """images: float [B, S, S, 3]; u: [B, NUM_U]. Mirrors rows with u_flip < 0.5."""
  return tf.where(_rows(u[:, _U_FLIP] < 0.5), tf.reverse(images, axis=[2]), images)


def _adjust_hue(images, delta) -> tf.Tensor:
  """torchvision adjust_hue on float RGB [B, H, W, 3] in [0, 1]; delta [B] in [-0.5, 0.5]."""
  hsv = tf.image.rgb_to_hsv(images)
  hue = tf.math.floormod(hsv[..., 0] + delta[:, None, None], 1.0)
  return tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1))


def _colour_jitter(images, c, strength: float, prob: float) -> tf.Tensor:
  """RandomApply([ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)], p=prob), per image, batched.

  images: float [B, H, W, 3] in [0, 1]; c: colour draws [B, NUM_C]. As torchvision, the four
  ops (0 brightness, 1 contrast, 2 saturation, 3 hue) run in a random order per image; each of
  the first three blends the image with a reference (black, the mean gray level, the gray
  image) and clips to [0, 1]; hue rotates the HSV hue. Images not jittered are unchanged.
  Every op is computed for the whole batch and selected per image (factor 1 = no-op): static
  shapes, so XLA fuses the stages into a few loops.
  """
  apply = c[:, _C_JITTER] < prob  # [B]
  lo, hi = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
  factors = tf.where(apply[:, None], lo + (hi - lo) * c[:, _C_FACTORS], 1.0)  # [B, 3]
  factors = tf.concat([factors, tf.ones_like(factors[:, :1])], axis=1)  # hue blends nothing
  hue = 0.2 * strength * (2.0 * c[:, _C_HUE] - 1.0)  # [B], uniform in [-0.2s, 0.2s]
  order = tf.argsort(c[:, _C_ORDER], axis=-1)  # [B, 4]: a uniform random permutation
  hue_at = tf.argmax(tf.cast(order == 3, tf.int32), axis=1, output_type=tf.int32)  # [B]

  def blends(images, before_hue: bool):
    # The blend ops that come before (after) each image's hue op; factor 1 = unchanged.
    for k in range(4):
      op = order[:, k]  # [B]
      active = k < hue_at if before_hue else k > hue_at
      f = tf.where(active, tf.gather(factors, op, batch_dims=1), 1.0)[:, None, None, None]
      gray = _grayscale(images)  # [B, H, W, 1]
      mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
      ref = tf.where(_rows(op == 1), mean, tf.where(_rows(op == 2), gray, 0.0))
      images = tf.clip_by_value(f * images + (1.0 - f) * ref, 0.0, 1.0)
    return images

  # Hue costs an HSV round trip: done once, between the two halves of each image's order.
  images = blends(images, before_hue=True)
  images = tf.where(_rows(apply), _adjust_hue(images, hue), images)
  return blends(images, before_hue=False)


def _random_grayscale(images, c, prob: float) -> tf.Tensor:
  """RandomGrayscale(p=prob): 3 equal channels of luma. images [B, H, W, 3]."""
  return tf.where(_rows(c[:, _C_GRAY] < prob), _grayscale(images), images)


def _blur_radius(sigma_max: float) -> int:
  return max(1, math.ceil(3.0 * sigma_max))  # 3 standard deviations hold 99.7% of the weight


def _gaussian_blur(images, sigma, radius: int) -> tf.Tensor:
  """Separable Gaussian blur with a standard deviation per image; sigma 0 leaves it unchanged.

  images: float [B, H, W, 3]; sigma: float [B]. Taps -radius..radius, edge pixels extended as
  PIL's GaussianBlur does. Each pass is a weighted sum of shifted copies, which XLA fuses into
  one loop (a per-image depthwise convolution is ~100x slower on XLA:CPU).
  """
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  s = tf.maximum(sigma, 1e-3)[:, None]  # sigma -> 0 gives a unit impulse
  kernel = tf.exp(-0.5 * tf.square(taps / s))
  kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)  # [B, K]

  def one_axis(x, axis):
    n = x.shape[axis]
    first = tf.gather(x, [0] * radius, axis=axis)
    last = tf.gather(x, [n - 1] * radius, axis=axis)
    padded = tf.concat([first, x, last], axis=axis)  # edges extended
    out = 0.0
    for t in range(2 * radius + 1):
      window = padded[:, t : t + n] if axis == 1 else padded[:, :, t : t + n]
      out += kernel[:, t, None, None, None] * window
    return out

  return one_axis(one_axis(images, 1), 2)


def _fill_corrupt_rows(images, ok) -> tf.Tensor:
  """Rows with ok=False take the image of a good row of the batch (the good rows in turn).

  images [B, S, S, 3], ok bool [B]. A batch with no good row is left as it is (mean colour).
  Static shapes throughout (for XLA): the good rows are sorted first by their index.
  """
  b = ok.shape[0]
  rows = tf.range(b)
  good_first = tf.argsort(tf.where(ok, rows, rows + b), stable=True)  # [B]
  n_good = tf.reduce_sum(tf.cast(ok, tf.int32))
  source = tf.gather(good_first, rows % tf.maximum(n_good, 1))
  return tf.gather(images, tf.where(ok | (n_good == 0), rows, source))


def _prepare(images, u, ok, data, pixel_scale: float) -> tf.Tensor:
  """Scale to [0, 1] and clip, fill corrupt rows, flip: float [B, S, S, 3]."""
  images = tf.clip_by_value(images * pixel_scale, 0.0, 1.0)  # bicubic overshoots
  images = _fill_corrupt_rows(images, ok)
  return _flip(images, u) if data.flip else images


def _jitter_and_grayscale(images, c, data) -> tf.Tensor:
  if data.color_jitter > 0 and data.color_jitter_prob > 0:
    images = _colour_jitter(images, c, float(data.color_jitter), float(data.color_jitter_prob))
  if data.grayscale_prob > 0:
    images = _random_grayscale(images, c, float(data.grayscale_prob))
  return images


def _blur_and_normalise(images, c, data) -> tf.Tensor:
  """Gaussian blur (with probability data.blur_prob), then the ImageNet normalisation."""
  if data.blur_prob > 0:
    lo, hi = (float(v) for v in data.blur_sigma)
    sigma = tf.where(c[:, _C_BLUR] < data.blur_prob, lo + (hi - lo) * c[:, _C_SIGMA], 0.0)
    images = _gaussian_blur(images, sigma, _blur_radius(hi))
  return _normalise(images)


def _augment_batch(images, u, c, ok, data, pixel_scale: float) -> tf.Tensor:
  """Everything after the crop, in the official order, then normalisation.

  images: float [B, S, S, 3], pixels in [0, 1 / pixel_scale] (decoded sources hand over the
  resized 0..255 values: scaling and clipping happen here, fused); u: crop draws [B, NUM_U];
  c: colour draws [B, NUM_C]; ok: bool [B], False where decoding failed; data: config.data.
  Returns normalised float32 [B, S, S, 3].
  """
  images = _prepare(images, u, ok, data, pixel_scale)
  images = _jitter_and_grayscale(images, c, data)
  return _blur_and_normalise(images, c, data)


def _compiled_augment(data, pixel_scale: float):
  """_augment_batch as up to three XLA computations, with the same results.

  XLA fuses each part's elementwise ops into a few passes over the batch (~6x faster than TF's
  kernels for flip + normalise alone). The parts materialise their outputs: fused into a
  consumer that reads them many times (the blur's taps, the jitter's stages), XLA would
  recompute them for each read.
  """
  jit = functools.partial(tf.function, jit_compile=True)
  jitter = data.color_jitter > 0 and data.color_jitter_prob > 0
  blur = data.blur_prob > 0
  if not jitter and not blur:  # Nothing read many times: one computation.
    return jit(lambda images, u, c, ok: _augment_batch(images, u, c, ok, data, pixel_scale))
  finish = jit(lambda images, c: _blur_and_normalise(images, c, data))
  if not jitter:
    first = jit(
      lambda i, u, c, ok: _jitter_and_grayscale(_prepare(i, u, ok, data, pixel_scale), c, data)
    )
    return lambda images, u, c, ok: finish(first(images, u, c, ok), c)
  prepare = jit(lambda images, u, ok: _prepare(images, u, ok, data, pixel_scale))
  colour = jit(lambda images, c: _jitter_and_grayscale(images, c, data))
  return lambda images, u, c, ok: finish(colour(prepare(images, u, ok), c), c)


# ---------------------------------------------------------------------------------------------
# Decoding encoded images (tfds records and folder files).


def _decode_crop(data, u, size: int, scale, ratio, method: str) -> tf.Tensor:
  """Encoded image bytes -> RandomResizedCrop float32 [size, size, 3] in 0..255 (unclipped).

  JPEGs are decoded only inside the crop window (most of the decoding work saved); PNG, GIF and
  BMP are decoded whole and then cropped. Raises (inside tf.data) on undecodable data. The
  uint8 crop is resized directly, and scaled to [0, 1] later in the fused batch step.
  """

  def jpeg():
    shape = tf.image.extract_jpeg_shape(data)
    window = _crop_windows(u, shape[0], shape[1], scale, ratio)
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = tf.unstack(_crop_windows(u, shape[0], shape[1], scale, ratio))
    return image[y : y + h, x : x + w, :]

  crop = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  return tf.image.resize(crop, [size, size], method=method, antialias=True)


def _decode_full(data) -> tf.Tensor:
  """Encoded image bytes (any of JPEG/PNG/GIF/BMP) -> uint8 [h, w, 3]."""
  return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)


def _mean_image(size: int) -> tf.Tensor:
  """The fill (0..255) of an image that could not be decoded: normalises to 0."""
  return tf.broadcast_to(255.0 * tf.constant(MEAN_RGB, tf.float32), [size, size, 3])


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


def _interleave_safely(ds, fn, fallback, keep) -> tf.data.Dataset:
  return ds.interleave(
    _safely(fn, fallback, keep),
    cycle_length=tf.data.AUTOTUNE,
    block_length=1,
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )


# ---------------------------------------------------------------------------------------------
# Sources.


@functools.cache
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """sklearn digits, split once with a fixed seed: {'train': 1437, 'test': 360} (images [N, 8, 8])."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)  # Values 0..16 -> [0, 1].
  labels = digits.target.astype(np.int32)
  # Fixed random_state: the held-out split must not move with config.seed.
  x_tr, x_te, y_tr, y_te = train_test_split(
    images, labels, test_size=0.2, random_state=0, stratify=labels
  )
  return {'train': (x_tr, y_tr), 'test': (x_te, y_te)}


def _upscale_digits(gray, config) -> tf.Tensor:
  """float [..., 8, 8] in [0, 1] -> [..., S, S, 3], upscaled with config.data.digits_upscale."""
  method = config.data.digits_upscale
  if method not in ('bilinear', 'bicubic'):
    raise ValueError(f'config.data.digits_upscale={method!r}: expected bilinear or bicubic.')
  size = config.model.image_size
  image = tf.image.resize(gray[..., None], [size, size], method=method)
  return tf.image.grayscale_to_rgb(tf.clip_by_value(image, 0.0, 1.0))


def _synthetic_split_key(split: str) -> int:
  return zlib.crc32(split.encode())  # Stable across runs, unlike hash().


def _synthetic_source_size(size: int) -> int:
  return max(8, size // 4)  # Low-resolution noise: cheap to draw, smooth once enlarged.


def _synthetic_image(split_key, index, size: int) -> tf.Tensor:
  """Noise [s, s, 3] in [0, 1], s = _synthetic_source_size(size); fixed per (split, index)."""
  src = _synthetic_source_size(size)
  return _uniform([src, src, 3], _key(_STREAM_SYNTH_PIXELS, split_key, index))


def _synthetic_label(split_key, index) -> tf.Tensor:
  key = _key(_STREAM_SYNTH_LABELS, split_key, index)
  return _uniform([], key, 0, SYNTHETIC_NUM_CLASSES, tf.int32)


# Image folder --------------------------------------------------------------------------------


def _folder_layout_help(root: str, split: str) -> str:
  return (
    f'An image folder holds one directory per class under {os.path.join(root, split)}, e.g.\n'
    f'  {os.path.join(root, split, "n01440764", "n01440764_10026.JPEG")}\n'
    f'(the layout the official code reads: root/train/<class>/*.JPEG and root/val/<class>/...; '
    f'classes are sorted by name to give the labels; extensions {", ".join(IMAGE_EXTENSIONS)}, '
    'any case). Set config.data.data_dir=<root> and config.data.train_split / eval_split to '
    'the split directories.'
  )


@functools.cache
def _folder_classes(root: str, split: str) -> tuple[str, ...]:
  """Sorted class directory names of root/split; fails with the expected layout if none."""
  where = os.path.join(root, split)
  if not root or not tf.io.gfile.isdir(where):
    raise DatasetNotReadyError(
      f'image folder {where!r} does not exist.\n{_folder_layout_help(root, split)}'
    )
  classes = sorted(
    d.rstrip('/') for d in tf.io.gfile.listdir(where) if tf.io.gfile.isdir(os.path.join(where, d))
  )
  if not classes:
    raise DatasetNotReadyError(
      f'image folder {where!r} has no class directories.\n{_folder_layout_help(root, split)}'
    )
  return tuple(classes)


@functools.cache
def _folder_files(root: str, split: str, class_split: str) -> tuple[np.ndarray, np.ndarray]:
  """Paths (str [N], sorted by class then name) and labels (int32 [N]) of root/split.

  Labels index the sorted classes of root/class_split (the train split), so train and eval
  agree even if a split misses a class.
  """
  classes = {name: i for i, name in enumerate(_folder_classes(root, class_split))}
  where = os.path.join(root, split)
  paths, labels = [], []
  for name in _folder_classes(root, split):
    if name not in classes:
      raise DatasetNotReadyError(
        f'image folder {where!r} has class {name!r}, which {os.path.join(root, class_split)!r} '
        'does not have: the splits must share their class directories.'
      )
    files = sorted(
      f
      for f in tf.io.gfile.listdir(os.path.join(where, name))
      if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    paths += [os.path.join(where, name, f) for f in files]
    labels += [classes[name]] * len(files)
  if not paths:
    raise DatasetNotReadyError(
      f'image folder {where!r} has class directories but no images.\n'
      f'{_folder_layout_help(root, split)}'
    )
  return np.asarray(paths), np.asarray(labels, np.int32)


def _folder_split(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  return _folder_files(config.data.data_dir, split, config.data.train_split)


def folder_to_tfds(
  root: str,
  data_dir: str,
  name: str,
  splits: Sequence[str] = ('train',),
  num_shards: int = 1,
  seed: int = 0,
) -> str:
  """Writes an image folder as a tfds dataset that `data.source='tfds'` reads as `data.name=name`.

  root/<split>/<class>/<image> becomes data_dir/name/1.0.0 with features image (the file's bytes,
  not re-encoded and not checked, so a corrupt file stays corrupt), label (sorted classes of
  the first split) and file_name; each split is shuffled with `seed` (as tfds shuffles when it
  prepares a dataset) and cut into `num_shards` TFRecord files. Returns the version directory.
  """
  from tensorflow_datasets.core import example_serializer

  if num_shards < 1:
    raise ValueError(f'num_shards={num_shards}: expected >= 1.')
  classes = _folder_classes(root, splits[0])
  listing = {s: _folder_files(root, s, splits[0]) for s in splits}
  all_jpeg = all(
    str(p).lower().endswith(('.jpeg', '.jpg')) for paths, _ in listing.values() for p in paths
  )
  features = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(encoding_format='jpeg' if all_jpeg else None),
      'label': tfds.features.ClassLabel(names=list(classes)),
      'file_name': tfds.features.Text(),
    }
  )
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  out = os.path.join(data_dir, name, '1.0.0')
  tf.io.gfile.makedirs(out)
  template = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
  infos = []
  for split, (paths, labels) in listing.items():
    order = np.random.default_rng(seed).permutation(len(paths))
    bounds = np.linspace(0, len(paths), num_shards + 1).round().astype(int)
    lengths, num_bytes = [], 0
    for shard in range(num_shards):
      filename = f'{name}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}'
      with tf.io.TFRecordWriter(os.path.join(out, filename)) as writer:
        for i in order[bounds[shard] : bounds[shard + 1]]:
          with tf.io.gfile.GFile(paths[i], 'rb') as f:
            record = serializer.serialize_example(
              {'image': f.read(), 'label': int(labels[i]), 'file_name': os.path.basename(paths[i])}
            )
          writer.write(record)
          num_bytes += len(record)
      lengths.append(int(bounds[shard + 1] - bounds[shard]))
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes))
  tfds.folder_dataset.write_metadata(
    data_dir=out, features=features, split_infos=infos, filename_template=template, check_data=False
  )
  return out


# tfds ----------------------------------------------------------------------------------------


def _tfds_builder(config):
  data_dir = config.data.data_dir or None
  try:
    return tfds.builder(config.data.name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise DatasetNotReadyError(
      f'config.data.name={config.data.name!r} is not a known tfds dataset, and '
      f'{data_dir or "the tfds data_dir"} holds no prepared dataset of that name.'
    ) from e


def _not_ready_message(config, builder) -> str:
  name, data_dir = config.data.name, config.data.data_dir
  where = data_dir or f'{getattr(builder, "data_dir_root", "")} (the tfds default)'
  msg = (
    f'tfds dataset {name!r} is not prepared in {where}. Prepare it once with:\n'
    f'  tfds build {name} --data_dir={data_dir or "<dir>"}'
  )
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if manual:
    msg += (
      ' --manual_dir=<manual dir>\nThis dataset cannot be downloaded by tfds; put its files in '
      f'<manual dir> first:\n{textwrap.indent(textwrap.dedent(manual).strip(), "  ")}'
    )
  if not data_dir:
    msg += '\nand set config.data.data_dir=<dir>.'
  return msg


def _tfds_dataset(config, builder, split, **kwargs) -> tf.data.Dataset:
  """builder.as_dataset, turning a missing preparation into one clear start-up error."""
  try:
    return builder.as_dataset(split=split, **kwargs)
  except (AssertionError, ValueError, KeyError, FileNotFoundError, tf.errors.NotFoundError) as e:
    # tfds's own first line says which of (unprepared, bad split, ...) it was.
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DatasetNotReadyError(f'{_not_ready_message(config, builder)}\n(tfds: {cause})') from e


def _check_image_feature(config, builder):
  feature = builder.info.features
  if 'image' not in feature or not isinstance(feature['image'], tfds.features.Image):
    raise ValueError(
      f'config.data.name={config.data.name!r}: expected an encoded tfds Image feature named '
      f"'image'; the features are {sorted(feature.keys())}."
    )


def _tfds_shard(config, process_index: int, process_count: int):
  """This process's even split of the train split: (builder, files, skips, takes), as numpy.

  files str [F]; skips / takes int64 [F]: read records [skip, skip + take) of each file.
  """
  builder = _tfds_builder(config)
  split = tfds.even_splits(config.data.train_split, n=process_count)[process_index]
  try:
    instructions = builder.info.splits[split].file_instructions
  except (KeyError, ValueError, AssertionError) as e:
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DatasetNotReadyError(f'{_not_ready_message(config, builder)}\n(tfds: {cause})') from e
  _check_image_feature(config, builder)
  file_format = str(getattr(builder.info, 'file_format', 'tfrecord')).lower()
  if 'tfrecord' not in file_format:
    raise ValueError(
      f'config.data.name={config.data.name!r} is stored as {file_format}; the training reader '
      f'reads TFRecord shards. Prepare it with `tfds build {config.data.name} '
      '--file_format=tfrecord`.'
    )
  files = np.asarray([str(i.filename) for i in instructions])
  skips = np.asarray([i.skip for i in instructions], np.int64)
  takes = np.asarray([i.take for i in instructions], np.int64)
  if takes.sum() <= 0:
    raise DatasetNotReadyError(
      f'tfds split {config.data.train_split!r} of {config.data.name!r} has no examples for '
      f'process {process_index} of {process_count}.\n{_not_ready_message(config, builder)}'
    )
  for f in {files[0], files[-1]}:  # Cheap check that the shards are where the metadata says.
    if not tf.io.gfile.exists(f):
      raise DatasetNotReadyError(
        f'tfds shard {f} is missing (metadata found, data files not).\n'
        f'{_not_ready_message(config, builder)}'
      )
  return builder, files, skips, takes


def num_train_examples(config: ml_collections.ConfigDict) -> int:
  """Examples per epoch: config.data.num_train_examples if > 0, else the source's size."""
  if config.data.num_train_examples > 0:
    return int(config.data.num_train_examples)
  source = config.data.source
  if source == 'digits':
    return len(_digits_splits()['train'][1])
  if source == 'synthetic':
    return SYNTHETIC_NUM_EXAMPLES
  if source == 'folder':
    return len(_folder_split(config, config.data.train_split)[0])
  builder = _tfds_builder(config)
  try:
    return int(builder.info.splits[config.data.train_split].num_examples)
  except KeyError as e:
    raise DatasetNotReadyError(_not_ready_message(config, builder)) from e


# ---------------------------------------------------------------------------------------------
# Training stream: (image [S, S, 3] in [0, 1], crop draws [NUM_U], ok, key) per example.


def _random_access_stream(config, start_step: int, b_local: int, row0: int) -> tf.data.Dataset:
  """digits / synthetic / folder: the rows [row0, row0 + B_local) of every global batch.

  Example p = step * global_batch + row of the stream is item perm_e[p % N] with e = p // N and
  perm_e a permutation keyed on (seed, e): every epoch is a fresh shuffle, and any step can be
  computed directly.
  """
  size, global_batch = config.model.image_size, config.data.global_batch_size
  scale, ratio = tuple(config.data.crop_scale), tuple(config.data.crop_ratio)
  method = config.data.interpolation
  source = config.data.source
  if source == 'digits':
    gray = tf.constant(_digits_splits()['train'][0])  # [N, 8, 8]
    n, src = int(gray.shape[0]), size  # Upscaled to S before cropping.
  elif source == 'folder':
    paths = _folder_split(config, config.data.train_split)[0]
    n, paths = len(paths), tf.constant(paths)
  else:
    n, src = num_train_examples(config), _synthetic_source_size(size)
    split_key = _synthetic_split_key(config.data.train_split)
  order_key = _key(_STREAM_ORDER, config.seed)

  def plan(step):
    # One step at once: what each row reads (vectorised, cheap).
    pos = step * global_batch + row0 + tf.range(b_local, dtype=tf.int64)  # [B_local]
    index = _permute(pos % n, order_key, pos // n, n)
    u = _step_draws(config, step, row0, b_local)
    if source == 'folder':
      return tf.gather(paths, index), u
    windows = _crop_windows(u, src, src, scale, ratio)  # [B_local, 4]
    image_source = _upscale_digits(tf.gather(gray, index), config) if source == 'digits' else index
    return image_source, windows, u

  ds = tf.data.Dataset.range(start_step, _NEVER)
  ds = ds.map(plan, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  if source == 'folder':
    ds = _interleave_safely(
      ds,
      lambda path, u: _decode_crop(tf.io.read_file(path), u, size, scale, ratio, method),
      _mean_image(size),
      lambda path, u: (u, path),
    )
    return ds.map(lambda image, ok, kept: (image, kept[0], ok, kept[1]))

  def example(image_source, window, u):
    image = image_source if source == 'digits' else _synthetic_image(split_key, image_source, size)
    # Crops of a source no larger than S are only enlarged: antialiasing would change nothing.
    return _crop_resize(image, window, size, method, antialias=False), u, True, ''

  return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_windows(n: int, window: int, key) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """One epoch of a process's shard of n records, cut into windows, in visiting order.

  key: int64 [2] keyed on (seed, process, epoch). Returns (ids, starts, ends), int64 [n_windows]
  each: window ids[i] (its place in the cut) covers records [starts[i], ends[i]) of the shard.
  The cuts sit at offset + j * window with the offset uniform in [0, window) when n > window,
  so the records that share a window change from epoch to epoch.
  """
  if n > window:
    offset = _uniform([], key, 0, window, tf.int64)
  else:
    offset = tf.constant(0, tf.int64)
  first = tf.where(offset > 0, offset - window, tf.constant(0, tf.int64))
  raw = tf.range(first, n, window, dtype=tf.int64)
  starts, ends = tf.maximum(raw, 0), tf.minimum(raw + window, n)
  count = tf.size(raw, out_type=tf.int64)
  ids = _permute(tf.range(count), key, 0, count)
  return ids, tf.gather(starts, ids), tf.gather(ends, ids)


def _tfds_stream(config, start_step, b_local, row0, process_index, process_count):
  """tfds: this process's even split, read in shuffled windows, from example start_step * B_local.

  See the module docstring; the resume position is found in Python from the epoch's windows, so
  a restart reads one window of raw records whatever the step.
  """
  builder, files, skips, takes = _tfds_shard(config, process_index, process_count)
  size, method = config.model.image_size, config.data.interpolation
  scale, ratio = tuple(config.data.crop_scale), tuple(config.data.crop_ratio)
  n = int(takes.sum())
  window = int(min(config.data.shuffle_window, n))
  first = np.concatenate([[0], np.cumsum(takes)[:-1]]).astype(np.int64)  # shard position of files
  names = tf.constant([os.path.basename(f) for f in files])
  files_t, first_t = tf.constant(files), tf.constant(first)
  skips_t, takes_t = tf.constant(skips), tf.constant(takes)
  epoch_key = lambda e: _key(_STREAM_WINDOWS, config.seed, process_index, e)  # noqa: E731

  def windows_of_epoch(e):
    ids, starts, ends = _tfds_windows(n, window, epoch_key(e))
    return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(ids), e), ids, starts, ends))

  def shuffle_window(e, wid, records, file_ids, indices):
    m = tf.size(records, out_type=tf.int64)
    perm = _permute(tf.range(m), epoch_key(e), wid + 1, m)
    # tfds's own example id format: <shard file>__<record index>.
    keys = tf.strings.join([tf.gather(names, file_ids), '__', tf.strings.as_string(indices)])
    return tf.gather(records, perm), tf.gather(keys, perm)

  def read_window(e, wid, start, end):
    # The pieces of each file that fall in [start, end) of the shard.
    lo, hi = tf.maximum(start, first_t), tf.minimum(end, first_t + takes_t)
    sel = tf.where(lo < hi)[:, 0]
    pieces = tf.data.Dataset.from_tensor_slices(
      (sel, tf.gather(skips_t + lo - first_t, sel), tf.gather(hi - lo, sel))
    )

    def piece(f, skip, take):
      path = tf.gather(files_t, f)
      records = tf.data.TFRecordDataset(path, buffer_size=_TFRECORD_BUFFER).skip(skip).take(take)
      where = tf.data.Dataset.range(skip, skip + take).map(lambda i: (f, i))
      return tf.data.Dataset.zip(records, where).map(lambda r, fi: (r, fi[0], fi[1]))

    # At most `window` records: exactly one element, the whole window, shuffled in memory.
    whole = pieces.flat_map(piece).batch(window)
    return whole.map(lambda r, f, i: shuffle_window(e, wid, r, f, i))

  # Where start_step falls: epoch e0, window v0 of its visiting order, record r0 in it.
  e0, q0 = divmod(start_step * b_local, n)
  _, starts, ends = (x.numpy() for x in _tfds_windows(n, window, epoch_key(e0)))
  bounds = np.concatenate([[0], np.cumsum(ends - starts)])
  v0 = int(np.searchsorted(bounds, q0, side='right') - 1)
  r0 = int(q0 - bounds[v0])

  windows = tf.data.Dataset.range(e0, _NEVER).flat_map(windows_of_epoch).skip(v0)
  records = windows.interleave(
    read_window,
    cycle_length=_WINDOWS_IN_FLIGHT,
    block_length=1,
    num_parallel_calls=_WINDOWS_IN_FLIGHT,
    deterministic=True,
  )
  records = records.unbatch().skip(r0)  # Skipping inside one window: in memory, cheap.
  draws = tf.data.Dataset.range(start_step, _NEVER)
  draws = draws.map(lambda step: _step_draws(config, step, row0, b_local)).unbatch()
  ds = tf.data.Dataset.zip(records, draws).map(lambda rk, u: (rk[0], rk[1], u))
  features = builder.info.features
  decoders = {'image': tfds.decode.SkipDecoding()}

  def decode(record, key, u):
    del key
    image = features.deserialize_example(record, decoders=decoders)['image']
    return _decode_crop(image, u, size, scale, ratio, method)

  ds = _interleave_safely(ds, decode, _mean_image(size), lambda record, key, u: (u, key))
  return ds.map(lambda image, ok, kept: (image, kept[0], ok, kept[1]))


class TrainIterator(Iterator):
  """The batches of `create_train_iterator`, one per step; see there for their contents.

  Attributes:
    step: the global step of the next batch.
    corrupt: keys (file path, or tfds's `<shard file>__<record>`) of every image that could not be
      decoded so far, once per time it was met; each was replaced and logged with a warning.
  """

  def __init__(self, ds, config, mask_spec, start_step: int, row0: int, b_local: int):
    self._it = ds.as_numpy_iterator()
    self._config, self._mask_spec = config, mask_spec
    self._row0, self._b_local = row0, b_local
    self.step = start_step
    self.corrupt: list[str] = []

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    images, ok, keys = next(self._it)
    if not ok.all():
      bad = [k.decode('utf-8', 'replace') for k in keys[~ok]]
      self.corrupt += bad
      logging.warning(
        'input pipeline, step %d: skipped %d image(s) that could not be decoded (%d so far), '
        'each replaced by another image of its batch: %s',
        self.step,
        len(bad),
        len(self.corrupt),
        ', '.join(bad),
      )
    batch = {'image': images}
    if self._mask_spec is not None:
      batch.update(
        masking.sample_masks(
          self._mask_spec,
          self._config.seed,
          self.step,
          self._config.data.global_batch_size,
          start=self._row0,
          count=self._b_local,
        )
      )
    self.step += 1
    return batch


def create_train_iterator(
  config: ml_collections.ConfigDict,
  mask_spec,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainIterator:
  """This process's share of the global batch at steps start_step, start_step + 1, ...

  Each item: {'image': float32 [B_local, S, S, 3] (normalised), plus the arrays of
  masking.sample_masks for rows [process_index * B_local, (process_index + 1) * B_local) of the
  global batch}, B_local = global_batch_size / process_count. mask_spec=None yields images only
  (data benchmarks). The dataset is opened here, so an unprepared, empty or missing dataset
  fails now (DatasetNotReadyError), not at the first step. Starting at step k yields the same
  batches as an uninterrupted run from step k, at a cost independent of k.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = config.data.global_batch_size
  if global_batch % process_count:
    raise ValueError(
      f'config.data.global_batch_size={global_batch} is not divisible by the process count '
      f'({process_count}).'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  if start_step < 0:
    raise ValueError(f'start_step={start_step}: expected >= 0.')
  b_local = global_batch // process_count
  row0 = process_index * b_local
  source = config.data.source
  if source not in config_lib.DATA_SOURCES:
    raise ValueError(f'config.data.source={source!r}: expected one of {config_lib.DATA_SOURCES}.')
  if config.data.interpolation not in ('bilinear', 'bicubic'):
    raise ValueError(
      f'config.data.interpolation={config.data.interpolation!r}: expected bilinear or bicubic.'
    )
  if source == 'tfds':
    ds = _tfds_stream(config, start_step, b_local, row0, process_index, process_count)
  else:
    ds = _random_access_stream(config, start_step, b_local, row0)
  ds = ds.batch(b_local, drop_remainder=True)

  # Decoded sources hand over 0..255 pixels; digits / synthetic are already in [0, 1].
  pixel_scale = 1.0 / 255.0 if source in ('tfds', 'folder') else 1.0
  augment = _compiled_augment(config.data, pixel_scale)

  def finish(batch, step):
    images, u, ok, keys = batch
    colour = _colour_draws(config, step, row0, b_local)
    return augment(images, u, colour, ok), ok, keys

  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(start_step, _NEVER))
  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)
  return TrainIterator(ds, config, mask_spec, start_step, row0, b_local)


# ---------------------------------------------------------------------------------------------
# Device prefetch.

_END = object()


def prefetch_to_device(
  iterator: Iterable[dict[str, np.ndarray]], shardings: dict, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """Each per-process batch of `iterator` as global jax.Arrays, made `size` batches ahead.

  A background thread takes batches (dicts of numpy arrays, this process's rows) from
  `iterator` and turns each array into a global array with
  `jax.make_array_from_process_local_data(shardings[key], array)`, so the host-to-device copies
  of the next batches overlap the running step. Batches come out in order. An exception raised
  by `iterator` (or by the conversion) is raised here, at the batch where it happened.
  Closing the returned generator stops the thread.

  Args:
    iterator: yields {key: array [B_local, ...]} (for the trainer: create_train_iterator).
    shardings: {key: jax.sharding.Sharding} with an entry for every key of the batches.
    size: converted batches waiting at most (>= 1); the thread works on one more.
  Returns:
    A generator of {key: jax.Array of the global shape}.
  """
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ValueError(f'prefetch_to_device: size={size!r}, expected an int >= 1.')
  if not isinstance(shardings, dict) or not shardings:
    raise ValueError(f'prefetch_to_device: shardings={shardings!r}, expected a non-empty dict.')
  return _prefetch(iter(iterator), shardings, size)


def _prefetch(iterator, shardings, size):
  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for batch in iterator:
        arrays = batch_lib.to_global(batch, shardings)
        if not put((arrays, None)):
          return
      put((_END, None))
    except BaseException as e:  # Handed to the consumer, which re-raises it with its traceback.
      put((None, e))

  thread = threading.Thread(target=produce, name='prefetch_to_device', daemon=True)
  thread.start()
  try:
    while True:
      arrays, error = ready.get()
      if error is not None:
        raise error
      if arrays is _END:
        return
      yield arrays
  finally:
    stop.set()
    thread.join()


# ---------------------------------------------------------------------------------------------
# Probe data.


def _center_resize(image, size: int, method: str) -> tf.Tensor:
  """Shorter side to round(size * 256/224), then the central [size, size] crop, in [0, 1]."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = round(size * EVAL_RESIZE_RATIO) / tf.reduce_min(shape)
  new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = _resize(image, new_hw, method, antialias=True)
  y, x = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  return image[y : y + size, x : x + size, :]


def load_eval_arrays(
  config: ml_collections.ConfigDict, split: str, max_examples: int
) -> tuple[np.ndarray, np.ndarray]:
  """Un-augmented probe data: float32 images [N, S, S, 3] (normalised) and int32 labels [N].

  digits: split 'train' or 'test' (the fixed held-out split). tfds and folder: 'train' / 'test'
  mean config.data.train_split / eval_split, other names are splits of the source; every process
  reads the same examples: tfds the first max_examples of the split (tfds splits are shuffled
  when prepared), folder a fixed random subset of max_examples (a folder lists by class).
  max_examples < 0: all. Undecodable images are left out with a warning. synthetic: noise with
  random labels.
  """
  limit = None if max_examples < 0 else int(max_examples)
  size, method = config.model.image_size, config.data.interpolation
  source = config.data.source
  if source == 'digits':
    splits = _digits_splits()
    if split not in splits:
      raise ValueError(f'digits has splits {sorted(splits)}, not {split!r}.')
    gray, labels = (a[:limit] for a in splits[split])
    images = _normalise(_upscale_digits(tf.constant(gray), config)).numpy()
    return images.astype(np.float32), labels.astype(np.int32)
  fallback = tf.zeros([size, size, 3])
  if source == 'synthetic':
    n = SYNTHETIC_NUM_EXAMPLES if limit is None else limit
    key = _synthetic_split_key(split)
    ds = tf.data.Dataset.range(n).map(
      lambda i: (
        _resize(_synthetic_image(key, i, size), size, method, antialias=False),
        True,
        (_synthetic_label(key, i), ''),
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  elif source == 'folder':
    split = {'train': config.data.train_split, 'test': config.data.eval_split}.get(split, split)
    paths, labels = _folder_split(config, split)
    if limit is not None and limit < len(paths):
      # A fixed random subset, independent of the run seed: the listing is sorted by class.
      pick = np.sort(np.random.default_rng(0).permutation(len(paths))[:limit])
      paths, labels = paths[pick], labels[pick]
    ds = _interleave_safely(
      tf.data.Dataset.from_tensor_slices((paths, labels)),
      lambda path, label: _center_resize(_decode_full(tf.io.read_file(path)), size, method),
      fallback,
      lambda path, label: (label, path),
    )
  else:
    # The trainer asks for 'train' / 'test'; those mean the configured tfds splits.
    split = {'train': config.data.train_split, 'test': config.data.eval_split}.get(split, split)
    builder = _tfds_builder(config)
    read_config = tfds.ReadConfig(options=_options(), try_autocache=False, add_tfds_id=True)
    ds = _tfds_dataset(
      config,
      builder,
      split,
      shuffle_files=False,
      read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
    _check_image_feature(config, builder)
    if limit is not None:
      ds = ds.take(limit)
    ds = _interleave_safely(
      ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32), ex['tfds_id'])),
      lambda data, label, key: _center_resize(_decode_full(data), size, method),
      fallback,
      lambda data, label, key: (label, key),
    )
  ds = ds.map(lambda image, ok, kept: (_normalise(image), ok, kept[0], kept[1]))
  images, labels, bad = [], [], []
  for x, ok, y, keys in ds.with_options(_options()).batch(256).prefetch(2).as_numpy_iterator():
    images.append(x[ok])
    labels.append(y[ok])
    bad += [k.decode('utf-8', 'replace') for k in keys[~ok]]
  if bad:
    logging.warning(
      'probe data (%s, split %r): left out %d image(s) that could not be decoded: %s',
      source,
      split,
      len(bad),
      ', '.join(bad),
    )
  if not images:
    return np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int32)
  return np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.int32)
