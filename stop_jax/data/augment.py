"""Pixel transforms: the pretraining augmentation of a batch and the labelled-data transforms.

Pretraining follows StoP's official torchvision recipe (see `config`): RandomResizedCrop,
horizontal flip, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) in a random order applied with a probability,
RandomGrayscale, Gaussian blur (PIL `GaussianBlur(radius)`: radius is the standard deviation),
then the ImageNet normalisation. They run on float images in [0, 1] with torchvision's tensor
semantics. The crop is drawn per example (`crop_windows`, from `crop_draws`); everything after it
runs on the whole batch (`compiled_augment`, with `colour_draws`), as XLA computations.

The random draws of a step are rows of one [global_batch, ...] draw keyed on (seed, step), so a
row gets the same augmentation whatever the number of processes.

Labelled data (evaluation) uses its own transforms: `eval_transform` (resize the shorter side,
central crop) and `train_transform` (the linear probe's RandomResizedCrop + flip, VISSL's).
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from stop_jax.data import keys

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224  # Resize the shorter side to image_size * 256/224, then crop.
RRC_ATTEMPTS = 10  # As torchvision: fall back to a center crop after this many misses.
CROP_RATIO = (3 / 4, 4 / 3)  # The linear probe's RandomResizedCrop aspect ratios (torchvision's).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert('L').

# Columns of an example's crop draws: the crop attempts' scales and log-ratios, the crop
# offsets, the flip.
_U_SCALE = slice(0, RRC_ATTEMPTS)
_U_RATIO = slice(RRC_ATTEMPTS, 2 * RRC_ATTEMPTS)
_U_Y, _U_X, _U_FLIP = 2 * RRC_ATTEMPTS, 2 * RRC_ATTEMPTS + 1, 2 * RRC_ATTEMPTS + 2
_NUM_U = 2 * RRC_ATTEMPTS + 3

# Columns of an example's colour draws: jitter on/off, the brightness, contrast, saturation and
# hue factors, four keys whose argsort is the order of the jitter ops, grayscale, blur, sigma.
_C_JITTER, _C_FACTORS, _C_HUE = 0, slice(1, 4), 4
_C_ORDER = slice(5, 9)
_C_GRAY, _C_BLUR, _C_SIGMA = 9, 10, 11
_NUM_C = 12


def crop_draws(config, step, row0: int, b_local: int) -> tf.Tensor:
  """Crop/flip uniforms float32 [B_local, NUM_U] for this process's rows of the batch at `step`.

  They are rows of one [global_batch, NUM_U] draw keyed on (seed, step): a row gets the same
  augmentation whatever the number of processes.
  """
  key = keys.make_key(keys.STREAM_AUGMENT, config.seed, step)
  return keys.uniform([config.data.global_batch_size, _NUM_U], key)[row0 : row0 + b_local]


def colour_draws(config, step, row0: int, b_local: int) -> tf.Tensor:
  """Colour/blur uniforms float32 [B_local, NUM_C] of this process's rows at `step`."""
  key = keys.make_key(keys.STREAM_COLOUR, config.seed, step)
  return keys.uniform([config.data.global_batch_size, _NUM_C], key)[row0 : row0 + b_local]


def crop_windows(u, height, width, scale, ratio) -> tf.Tensor:
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
  n = RRC_ATTEMPTS
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


def resize(image, size, method: str, antialias: bool) -> tf.Tensor:
  """[h, w, 3] -> float32 [size, size, 3] (or [*size, 3] for a pair) in [0, 1].

  uint8 input is scaled by 1/255 after resizing, which skips a float copy of the larger crop.
  Clipped since bicubic overshoots.
  """
  scale = 1.0 / 255.0 if image.dtype == tf.uint8 else 1.0
  hw = [size, size] if isinstance(size, int) else size
  image = tf.image.resize(image, hw, method=method, antialias=antialias)
  return tf.clip_by_value(image * scale, 0.0, 1.0)


def crop_resize(image, window, size: int, method: str, antialias: bool) -> tf.Tensor:
  """The crop (y, x, h, w) of image [H, W, 3] resized to [size, size, 3]."""
  y, x, h, w = tf.unstack(window)
  return resize(image[y : y + h, x : x + w, :], size, method, antialias)


def normalise(images) -> tf.Tensor:
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
  one loop (a per-image depthwise convolution is far slower on XLA:CPU).
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
  return normalise(images)


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


def compiled_augment(data, pixel_scale: float):
  """_augment_batch as up to three XLA computations, with the same results.

  XLA fuses each part's elementwise ops into a few passes over the batch (TF's kernels make one
  pass per op, even for flip + normalise alone). The parts materialise their outputs: fused into a
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
# Labelled data: un-augmented and linear-probe transforms of single images.


def to_rgb_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 or float [h, w, 1 | 3 | 4] -> float32 [h, w, 3] in [0, 1] (alpha dropped)."""
  image = tf.image.convert_image_dtype(image, tf.float32)
  channels = tf.shape(image)[-1]
  image = tf.cond(channels == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3])
  return tf.ensure_shape(image, [None, None, 3])


def center_crop_resize(image, size: int, resize_ratio: float, method: str) -> tf.Tensor:
  """Shorter side to round(size * resize_ratio), then the central [size, size] crop, in [0, 1].

  image: uint8 or float [h, w, 3] (see `resize`); resized with antialiasing.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = round(size * resize_ratio) / tf.reduce_min(shape)
  new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = resize(image, new_hw, method, antialias=True)
  y, x = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  return image[y : y + size, x : x + size, :]


def eval_transform(
  image: tf.Tensor, size: int, resize_ratio: float, center_crop: bool = True
) -> tf.Tensor:
  """Resize the shorter side to round(size * resize_ratio), take the central size x size crop.

  Resizing is bilinear with antialiasing, the torchvision default of the VISSL transforms.

  Args:
    image: float [h, w, 3] in [0, 1].
    size: output side S.
    resize_ratio: >= 1 (256/224 in the VISSL/DINO protocols).
    center_crop: False: resize the whole image to S x S instead (aspect not kept).

  Returns:
    Normalised float32 [S, S, 3].
  """
  if center_crop:
    image = center_crop_resize(image, size, resize_ratio, 'bilinear')
  else:
    image = resize(image, [size, size], 'bilinear', antialias=True)
  return normalise(tf.ensure_shape(image, [size, size, 3]))


def train_transform(
  image: tf.Tensor, seed: tf.Tensor, size: int, crop_scale, flip: bool
) -> tf.Tensor:
  """RandomResizedCrop(size, scale=crop_scale, ratio=(3/4, 4/3)) and an optional flip.

  The crop is TF's Inception-style sampler (`stateless_sample_distorted_bounding_box`), the
  same distribution as torchvision's RandomResizedCrop: area fraction uniform in crop_scale,
  log-uniform aspect ratio, 10 attempts, then the whole image. Resizing as `eval_transform`.

  Args:
    image: float [h, w, 3] in [0, 1].
    seed: int [2] stateless seed of this example.
    size: output side S.
    crop_scale: (lo, hi) area fraction.
    flip: mirror horizontally with probability 1/2.

  Returns:
    Normalised float32 [S, S, 3].
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if crop_scale[0] < 1.0:
    begin, crop_hw, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed,
      min_object_covered=0.0,
      aspect_ratio_range=CROP_RATIO,
      area_range=tuple(crop_scale),
      max_attempts=RRC_ATTEMPTS,
      use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, crop_hw)
  # crop_scale (1, 1): the whole image, aspect not kept.
  image = resize(image, [size, size], 'bilinear', antialias=True)
  if flip:
    mirror = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(mirror, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return normalise(tf.ensure_shape(image, [size, size, 3]))
