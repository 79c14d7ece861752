"""RandAugment and random erasing for fine-tuning, as TF ops keyed on a stateless seed.

The MAE/BEiT fine-tuning recipe uses timm's `rand-m9-mstd0.5-inc1`: two ops drawn with
replacement from the 15 below, each applied with probability 1/2, at a magnitude drawn per op
from N(9, 0.5^2) clipped to [0, 10]; the 'increasing' variants get stronger with the magnitude.
Keras 3 ships a `RandAugment` layer, but it draws from a stateful seed generator (not per
example from a key: a resumed run would see other augmentations) and has another op set and
magnitude mapping, so this module follows timm's `auto_augment.py` (written anew, on float
images in [0, 1] instead of PIL uint8 images; the uint8-level ops quantise to 1/255 steps).

Op magnitudes (m in [0, 10], `s` a random sign):
  Rotate 30 m/10 deg s; ShearX/Y 0.3 m/10 s; TranslateX/YRel 0.45 m/10 of the side s;
  Color/Contrast/Brightness/Sharpness: blend factor 1 + 0.9 m/10 s; PosterizeIncreasing: keep
  4 - int(4 m/10) bits; SolarizeIncreasing: invert pixels >= 1 - m/10; SolarizeAdd: add
  int(110 m/10)/255 to pixels below 128/255; AutoContrast, Equalize, Invert: no magnitude.
Geometric ops fill with timm's fill colour (the ImageNet mean in uint8: 124, 116, 104).
"""

from __future__ import annotations

import math

import tensorflow as tf

LEVEL_MAX = 10.0
FILL_RGB = (124 / 255, 116 / 255, 104 / 255)
_GRAY = (0.299, 0.587, 0.114)
# Per op: [op index, apply draw, magnitude noise, sign draw].
_DRAWS_PER_OP = 4


def _gray(image):
  return tf.reduce_sum(image * tf.constant(_GRAY), axis=-1, keepdims=True)  # [H, W, 1]


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor (image - degenerate), clipped to [0, 1]."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _quantise(image):
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.int32)


def _projective(image, transform):
  """Bilinear warp, output pixel (x, y) <- input (a0 x + a1 y + a2, b0 x + b1 y + b2); the
  area outside the image gets FILL_RGB (warping image - fill with fill 0 is the same)."""
  fill = tf.constant(FILL_RGB)
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=(image - fill)[None],
    transforms=tf.cast(tf.reshape(transform, [1, 8]), tf.float32),
    output_shape=tf.shape(image)[:2],
    fill_value=0.0,
    interpolation='BILINEAR',
    fill_mode='CONSTANT',
  )
  return out[0] + fill


def _rotate(image, m, s):
  angle = math.radians(30.0) * m / LEVEL_MAX * s
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  c, n = tf.cos(angle), tf.sin(angle)
  # Inverse rotation about the centre: input = R(-angle) (output - centre) + centre.
  return _projective(image, [c, n, cx - c * cx - n * cy, -n, c, cy + n * cx - c * cy, 0.0, 0.0])


def _shear_x(image, m, s):
  return _projective(image, [1.0, 0.3 * m / LEVEL_MAX * s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def _shear_y(image, m, s):
  return _projective(image, [1.0, 0.0, 0.0, 0.3 * m / LEVEL_MAX * s, 1.0, 0.0, 0.0, 0.0])


def _translate_x(image, m, s):
  t = 0.45 * m / LEVEL_MAX * s * tf.cast(tf.shape(image)[1], tf.float32)
  return _projective(image, [1.0, 0.0, t, 0.0, 1.0, 0.0, 0.0, 0.0])


def _translate_y(image, m, s):
  t = 0.45 * m / LEVEL_MAX * s * tf.cast(tf.shape(image)[0], tf.float32)
  return _projective(image, [1.0, 0.0, 0.0, 0.0, 1.0, t, 0.0, 0.0])


def _enhance_factor(m, s):
  return 1.0 + 0.9 * m / LEVEL_MAX * s


def _color(image, m, s):
  return _blend(tf.tile(_gray(image), [1, 1, 3]), image, _enhance_factor(m, s))


def _contrast(image, m, s):
  # PIL: the rounded mean of the luma as a flat grey image.
  mean = tf.round(tf.reduce_mean(_gray(image)) * 255.0) / 255.0
  return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(m, s))


def _brightness(image, m, s):
  return _blend(tf.zeros_like(image), image, _enhance_factor(m, s))


def _sharpness(image, m, s):
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (border unfiltered)."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner > 0, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return _blend(degenerate, image, _enhance_factor(m, s))


def _posterize(image, m, s):
  del s
  bits = 4 - tf.cast(tf.floor(4.0 * m / LEVEL_MAX), tf.int32)
  step = tf.bitwise.left_shift(1, 8 - bits)
  return tf.cast((_quantise(image) // step) * step, tf.float32) / 255.0


def _solarize(image, m, s):
  del s
  threshold = (256.0 - tf.floor(256.0 * m / LEVEL_MAX)) / 255.0
  return tf.where(image >= threshold, 1.0 - image, image)


def _solarize_add(image, m, s):
  del s
  add = tf.floor(110.0 * m / LEVEL_MAX) / 255.0
  return tf.where(image < 128.0 / 255.0, tf.minimum(image + add, 1.0), image)


def _auto_contrast(image, m, s):
  del m, s
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scaled = (image - lo) / tf.maximum(hi - lo, 1e-12)
  return tf.where(hi > lo, scaled, image)


def _equalize_channel(q):
  """PIL ImageOps.equalize of one int32 channel [H, W] in 0..255 -> float [H, W] in [0, 1]."""
  histo = tf.histogram_fixed_width(q, [0, 255], nbins=256)
  nonzero = tf.boolean_mask(histo, histo > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  lut = (tf.cumsum(histo) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  out = tf.where(step == 0, q, tf.gather(lut, q))
  return tf.cast(out, tf.float32) / 255.0


def _equalize(image, m, s):
  del m, s
  q = _quantise(image)
  return tf.stack([_equalize_channel(q[..., c]) for c in range(3)], axis=-1)


def _invert(image, m, s):
  del m, s
  return 1.0 - image


# timm's _RAND_INCREASING_TRANSFORMS, in its order.
OPS = (
  ('AutoContrast', _auto_contrast),
  ('Equalize', _equalize),
  ('Invert', _invert),
  ('Rotate', _rotate),
  ('PosterizeIncreasing', _posterize),
  ('SolarizeIncreasing', _solarize),
  ('SolarizeAdd', _solarize_add),
  ('ColorIncreasing', _color),
  ('ContrastIncreasing', _contrast),
  ('BrightnessIncreasing', _brightness),
  ('SharpnessIncreasing', _sharpness),
  ('ShearX', _shear_x),
  ('ShearY', _shear_y),
  ('TranslateXRel', _translate_x),
  ('TranslateYRel', _translate_y),
)
OP_NAMES = tuple(name for name, _ in OPS)


def apply_op(image, index, magnitude, sign):
  """OPS[index] on float [H, W, 3] in [0, 1]; index an int32 scalar (only that op runs)."""
  branches = [lambda fn=fn: fn(image, magnitude, sign) for _, fn in OPS]
  return tf.ensure_shape(tf.switch_case(index, branches), image.shape)


def randaugment(
  image, seed, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob=0.5
):
  """timm's RandAugment (increasing ops) on one image, every draw keyed on `seed`.

  Args:
    image: float [H, W, 3] in [0, 1].
    seed: int [2] stateless seed of this example.
    num_ops: ops applied in sequence, each drawn uniformly with replacement.
    magnitude, magnitude_std: each op's magnitude ~ N(magnitude, std^2) clipped to [0, 10].
    prob: probability that each drawn op is applied.
  Returns:
    float32 [H, W, 3] in [0, 1].
  """
  if num_ops == 0:
    return image
  u = tf.random.stateless_uniform([num_ops, _DRAWS_PER_OP], seed)
  noise = tf.random.stateless_normal([num_ops], tf.random.experimental.stateless_fold_in(seed, 1))
  for i in range(num_ops):
    index = tf.minimum(tf.cast(u[i, 0] * len(OPS), tf.int32), len(OPS) - 1)
    m = tf.clip_by_value(magnitude + magnitude_std * noise[i], 0.0, LEVEL_MAX)
    sign = tf.where(u[i, 3] < 0.5, -1.0, 1.0)
    applied = apply_op(image, index, m, sign)
    image = tf.where(u[i, 1] < prob, applied, image)
  return tf.clip_by_value(image, 0.0, 1.0)


def random_erasing(image, seed, prob: float, attempts: int = 10):
  """timm's RandomErasing(mode='pixel', max_count=1) on a normalised image [H, W, C].

  With probability `prob`, a box of area uniform in [0.02, 1/3] of the image and log-uniform
  aspect in [0.3, 1/0.3] (the first of `attempts` draws that fits) gets N(0, 1) pixels.
  """
  if prob == 0:
    return image
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  u = tf.random.stateless_uniform([attempts, 4], seed)
  area = hf * wf * (0.02 + u[:, 0] * (1 / 3 - 0.02))
  aspect = tf.exp(math.log(0.3) + u[:, 1] * (math.log(1 / 0.3) - math.log(0.3)))
  bh = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  bw = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (bh < h) & (bw < w)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  bh, bw = bh[first], bw[first]
  top = tf.cast(u[first, 2] * tf.cast(h - bh + 1, tf.float32), tf.int32)
  left = tf.cast(u[first, 3] * tf.cast(w - bw + 1, tf.float32), tf.int32)
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
  keys = tf.random.experimental.stateless_split(seed, 2)
  erase = tf.reduce_any(fits) & (tf.random.stateless_uniform([], keys[0]) < prob)
  noise = tf.random.stateless_normal(tf.shape(image), keys[1])
  return tf.where(box & erase, noise, image)
