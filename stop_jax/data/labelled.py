"""Evaluation data: labelled images for the probes, from tfds, an image folder, digits or noise.

One spec (`EvalData`) names a split of a source; two streams read it, each returning this
process's share of every global batch (per-process sharding, so a multi-host evaluation reads
each example once):

- `eval_batches`: un-augmented images (shorter side to `image_size * resize_ratio`, central
  crop), in file order, padded to whole batches with `valid=False` rows so every process runs
  the same number of steps with one static shape.
- `train_batches`: the VISSL linear-probe augmentation (RandomResizedCrop + horizontal flip),
  shuffled, repeated forever, whole batches only.

Resizing is bilinear with antialiasing, the torchvision default of the VISSL transforms. Pixels
are normalised with the ImageNet mean/std, as in pretraining.

Labels: the tfds `label` feature, or the VTAB definitions on CLEVR (`clevr_count`: number of
objects minus 3, 8 classes; `clevr_distance`: the depth of the closest object binned by VTAB's
thresholds, 6 classes). VTAB evaluates CLEVR on tfds `validation` (its test split has no scene
annotations).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zlib
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from stop_jax import config as config_lib
from stop_jax.data import pipeline as input_pipeline
from stop_jax.data.pipeline import MEAN_RGB, STD_RGB, DatasetNotReadyError, load_eval_arrays

SOURCES = config_lib.EVAL_SOURCES
LABELS = config_lib.EVAL_LABELS
# VTAB `clevr(task="closest_object_distance")`: label = index of the largest threshold below the
# closest object's depth (`pixel_coords[:, 2]`), giving 6 roughly balanced classes.
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
CLEVR_COUNT_MIN_OBJECTS = 3  # CLEVR scenes hold 3..10 objects: 8 classes.
_NUM_CLASSES_OF_LABEL = {'clevr_count': 8, 'clevr_distance': 6}

DIGITS_NUM_CLASSES = 10
SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_SIZE = 48  # Generated images are this square size before the transforms.
SYNTHETIC_DEFAULT_EXAMPLES = {'train': 10_000, 'test': 2_000}
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (torchvision default).
_RRC_ATTEMPTS = 10  # As torchvision: keep the whole image after this many misses.
_SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class EvalData:
  """One split of one labelled image source.

  Attributes:
    source: tfds | folder | digits | synthetic.
    name: tfds dataset name (source=tfds; may carry a config, e.g. 'imagenet2012_subset/1pct').
    data_dir: tfds data_dir ('' = default), or the root of `<root>/<split>/<class>/<image>`.
    split: split name; tfds split syntax is allowed. digits and synthetic have train / test.
    label: label | clevr_count | clevr_distance.
    image_size: output images are [image_size, image_size, 3].
    resize_ratio: un-augmented images: shorter side to image_size * resize_ratio, center crop.
    center_crop: False resizes un-augmented images whole to image_size (no crop).
    max_examples: first N examples of the split (-1 = all).
    digits_upscale: digits only, how 8x8 digits are upscaled (config.data.digits_upscale).
    class_split: folder only, the split whose sorted class directories define the labels (the
      train split, so every split labels alike); '' = split itself.
  """

  source: str
  name: str = ''
  data_dir: str = ''
  split: str = 'train'
  label: str = 'label'
  image_size: int = 224
  resize_ratio: float = 256 / 224
  center_crop: bool = True
  max_examples: int = -1
  digits_upscale: str = 'bilinear'
  class_split: str = ''

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f'EvalData.source={self.source!r} is not allowed: one of {SOURCES}.')
    if self.label not in LABELS:
      raise ValueError(f'EvalData.label={self.label!r} is not allowed: one of {LABELS}.')
    if self.label != 'label' and self.source != 'tfds':
      raise ValueError(f'label={self.label!r} needs source=tfds (CLEVR scene annotations).')
    if self.image_size <= 0 or self.resize_ratio < 1:
      raise ValueError(
        f'image_size={self.image_size} / resize_ratio={self.resize_ratio}: need > 0 / >= 1.'
      )
    if self.source == 'folder' and not self.data_dir:
      raise ValueError('source=folder needs data_dir=<root> holding <root>/<split>/<class>/*.')


def from_eval_config(config, role: str, image_size: int) -> EvalData:
  """The train or test split named by the `eval` group of an eval config."""
  e = config.eval
  if role not in ('train', 'test'):
    raise ValueError(f"role={role!r}: expected 'train' or 'test'.")
  split = e.train_split if role == 'train' else e.test_split
  if e.source in ('digits', 'synthetic'):
    split = role
  return EvalData(
    source=e.source,
    name=e.dataset,
    data_dir=e.data_dir,
    split=split,
    label=e.label,
    image_size=image_size,
    resize_ratio=float(e.resize_ratio),
    center_crop=bool(e.center_crop),
    max_examples=e.max_train_examples if role == 'train' else e.max_test_examples,
    digits_upscale=config.data.digits_upscale,
    class_split=e.train_split,
  )


def from_run_config(config, role: str, max_examples: int) -> EvalData:
  """A split of the run's own pretraining data (config.data), e.g. for k-NN during training."""
  d = config.data
  if d.source not in SOURCES:
    raise ValueError(f'config.data.source={d.source!r} has no eval reader: one of {SOURCES}.')
  if d.source in ('digits', 'synthetic'):
    split = role
  else:
    split = d.train_split if role == 'train' else d.eval_split
  return EvalData(
    source=d.source,
    name=d.name,
    data_dir=d.data_dir,
    split=split,
    image_size=config.model.image_size,
    max_examples=max_examples,
    digits_upscale=d.digits_upscale,
    class_split=d.train_split,
  )


# ---------------------------------------------------------------------------------------------
# Labels.


def clevr_count_label(example: dict) -> tf.Tensor:
  """VTAB CLEVR/Count: number of objects in the scene minus 3 (classes 0..7 for 3..10)."""
  return tf.cast(tf.size(example['objects']['size']) - CLEVR_COUNT_MIN_OBJECTS, tf.int32)


def clevr_distance_label(example: dict) -> tf.Tensor:
  """VTAB CLEVR/Dist: depth of the closest object, binned by CLEVR_DISTANCE_THRESHOLDS.

  The label is the index of the largest threshold strictly below the minimum depth, so the
  bins are (0, 8], (8, 8.5], ..., (10, 100].
  """
  depth = tf.reduce_min(tf.cast(example['objects']['pixel_coords'][:, 2], tf.float32))
  below = tf.constant(CLEVR_DISTANCE_THRESHOLDS, tf.float32) < depth
  return tf.reduce_sum(tf.cast(below, tf.int32)) - 1


_LABEL_FNS = {
  'label': lambda ex: tf.cast(ex['label'], tf.int32),
  'clevr_count': clevr_count_label,
  'clevr_distance': clevr_distance_label,
}


# ---------------------------------------------------------------------------------------------
# Transforms: float images in [0, 1] of any size -> normalised [S, S, 3].


def _to_rgb_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 or float [h, w, 1 | 3 | 4] -> float32 [h, w, 3] in [0, 1] (alpha dropped)."""
  image = tf.image.convert_image_dtype(image, tf.float32)
  channels = tf.shape(image)[-1]
  image = tf.cond(channels == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3])
  return tf.ensure_shape(image, [None, None, 3])


def _normalise(image: tf.Tensor) -> tf.Tensor:
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


def _resize(image: tf.Tensor, hw) -> tf.Tensor:
  image = tf.image.resize(image, hw, method='bilinear', antialias=True)
  return tf.clip_by_value(image, 0.0, 1.0)


def eval_transform(
  image: tf.Tensor, size: int, resize_ratio: float, center_crop: bool = True
) -> tf.Tensor:
  """Resize the shorter side to round(size * resize_ratio), take the central size x size crop.

  Args:
    image: float [h, w, 3] in [0, 1].
    size: output side S.
    resize_ratio: >= 1 (256/224 in the VISSL/DINO protocols).
    center_crop: False: resize the whole image to S x S instead (aspect not kept).

  Returns:
    Normalised float32 [S, S, 3].
  """
  if not center_crop:
    return _normalise(tf.ensure_shape(_resize(image, [size, size]), [size, size, 3]))
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = round(size * resize_ratio) / tf.reduce_min(hw)
  new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), size)
  image = _resize(image, new_hw)
  y, x = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  return _normalise(tf.ensure_shape(image[y : y + size, x : x + size, :], [size, size, 3]))


def train_transform(
  image: tf.Tensor, seed: tf.Tensor, size: int, crop_scale, flip: bool
) -> tf.Tensor:
  """RandomResizedCrop(size, scale=crop_scale, ratio=(3/4, 4/3)) and an optional flip.

  The crop is TF's Inception-style sampler (`stateless_sample_distorted_bounding_box`), the
  same distribution as torchvision's RandomResizedCrop: area fraction uniform in crop_scale,
  log-uniform aspect ratio, 10 attempts, then the whole image.

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
      max_attempts=_RRC_ATTEMPTS,
      use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, crop_hw)
  image = _resize(image, [size, size])  # crop_scale (1, 1): the whole image, aspect not kept
  if flip:
    mirror = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(mirror, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return _normalise(tf.ensure_shape(image, [size, size, 3]))


# ---------------------------------------------------------------------------------------------
# Raw per-process streams of (float image [h, w, 3] in [0, 1], int32 label).


def _tfds_builder(spec: EvalData):
  try:
    return tfds.builder(spec.name, data_dir=spec.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotReadyError(f'unknown tfds dataset {spec.name!r}: {e}') from None


def _not_ready(spec: EvalData, err: Exception) -> DatasetNotReadyError:
  data_dir = f' --data_dir={spec.data_dir}' if spec.data_dir else ''
  return DatasetNotReadyError(
    f'tfds dataset {spec.name!r} split {spec.split!r} cannot be read ({err}). Prepare it with '
    f'`tfds build {spec.name}{data_dir}` (ImageNet, iNaturalist and Places need their archives '
    'in --manual_dir first).'
  )


def _sliced_split(spec: EvalData) -> str:
  return spec.split if spec.max_examples < 0 else f'{spec.split}[:{spec.max_examples}]'


def _tfds_raw(spec: EvalData, index: int, count: int, shuffle_seed: int | None):
  builder = _tfds_builder(spec)
  split = tfds.even_splits(_sliced_split(spec), n=count, drop_remainder=False)[index]
  options = tf.data.Options()
  # Deterministic even when shuffled: the augmentation is keyed on the read position, so the
  # order must repeat for a rerun to see the same (image, crop) pairs.
  options.deterministic = True
  read_config = tfds.ReadConfig(options=options, try_autocache=False, shuffle_seed=shuffle_seed)
  try:
    ds = builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None, read_config=read_config
    )
  except (AssertionError, FileNotFoundError, ValueError, tf.errors.NotFoundError) as e:
    raise _not_ready(spec, e) from None
  label_fn = _LABEL_FNS[spec.label]
  return ds.map(
    lambda ex: (_to_rgb_float(ex['image']), label_fn(ex)), num_parallel_calls=tf.data.AUTOTUNE
  )


def _folder_index(spec: EvalData) -> tuple[np.ndarray, np.ndarray, int]:
  """(sorted file paths, labels, number of classes) of <data_dir>/<split>/<class>/*.

  The pretraining pipeline's folder reader: labels index the class_split's sorted classes.
  """
  root, class_split = os.path.abspath(spec.data_dir), spec.class_split or spec.split
  paths, labels = input_pipeline._folder_files(root, spec.split, class_split)
  return paths, labels, len(input_pipeline._folder_classes(root, class_split))


def _decode_file(path: tf.Tensor) -> tf.Tensor:
  return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


@functools.lru_cache(maxsize=4)
def _digits(split: str, size: int, upscale: str) -> tuple[np.ndarray, np.ndarray]:
  """The pretraining pipeline's digits split as float [N, S, S, 3] in [0, 1], int32 [N]."""
  c = config_lib.base_config()
  c.data.source, c.data.digits_upscale = 'digits', upscale
  c.model.image_size = c.model.patch_size = size
  images, labels = load_eval_arrays(c, split, -1)  # Normalised: undo it, transforms redo it.
  images = np.clip(images * np.asarray(STD_RGB) + np.asarray(MEAN_RGB), 0.0, 1.0)
  return images.astype(np.float32), labels


def _synthetic_example(split_key: int, i: tf.Tensor):
  """Noise whose per-channel mean depends on the label, so a linear probe can learn it."""
  label = tf.cast(i % SYNTHETIC_NUM_CLASSES, tf.int32)
  seed = tf.stack([tf.constant(split_key, tf.int64), tf.cast(i, tf.int64)])
  noise = tf.random.stateless_uniform([SYNTHETIC_SIZE, SYNTHETIC_SIZE, 3], seed)
  shift = tf.cast(label, tf.float32) / SYNTHETIC_NUM_CLASSES * tf.constant([1.0, 0.5, 0.25])
  return tf.clip_by_value(0.5 * noise + 0.5 * shift, 0.0, 1.0), label


def _synthetic_count(spec: EvalData) -> int:
  if spec.max_examples > 0:
    return spec.max_examples
  return SYNTHETIC_DEFAULT_EXAMPLES.get(spec.split, SYNTHETIC_DEFAULT_EXAMPLES['test'])


def _check_split(spec: EvalData, allowed=('train', 'test')):
  if spec.split not in allowed:
    raise ValueError(f'source={spec.source} has splits {allowed}, not {spec.split!r}.')


def _raw(spec: EvalData, index: int, count: int, shuffle_seed: int | None = None):
  """This process's shard of the split as (image, label); shuffled files if shuffle_seed."""
  if spec.source == 'tfds':
    return _tfds_raw(spec, index, count, shuffle_seed)
  limit = None if spec.max_examples < 0 else spec.max_examples
  if spec.source == 'folder':
    paths, labels, _ = _folder_index(spec)
    if limit is not None and limit < len(paths):
      # A fixed random subset: the listing is sorted by class, so its head would miss classes.
      keep = np.sort(np.random.default_rng(0).permutation(len(paths))[:limit])
      paths, labels = paths[keep], labels[keep]
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.shard(count, index)
    return ds.map(
      lambda p, y: (_to_rgb_float(_decode_file(p)), tf.cast(y, tf.int32)),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  _check_split(spec)
  if spec.source == 'digits':
    images, labels = _digits(spec.split, spec.image_size, spec.digits_upscale)
    ds = tf.data.Dataset.from_tensor_slices((images[:limit], labels[:limit]))
    return ds.shard(count, index)
  key = zlib.crc32(spec.split.encode())
  ds = tf.data.Dataset.range(_synthetic_count(spec)).shard(count, index)
  return ds.map(lambda i: _synthetic_example(key, i), num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# Public metadata and batch streams.


def num_classes(spec: EvalData) -> int:
  """Number of classes of the spec's labels."""
  if spec.label in _NUM_CLASSES_OF_LABEL:
    return _NUM_CLASSES_OF_LABEL[spec.label]
  if spec.source == 'digits':
    return DIGITS_NUM_CLASSES
  if spec.source == 'synthetic':
    return SYNTHETIC_NUM_CLASSES
  if spec.source == 'folder':
    return _folder_index(spec)[2]
  features = _tfds_builder(spec).info.features
  if 'label' not in features or not hasattr(features['label'], 'num_classes'):
    raise ValueError(f'tfds {spec.name!r} has no class label feature; set eval.label.')
  return int(features['label'].num_classes)


def num_examples(spec: EvalData) -> int:
  """Examples in the split (after max_examples), summed over processes."""
  if spec.source == 'digits':
    _check_split(spec)
    n = len(_digits(spec.split, spec.image_size, spec.digits_upscale)[1])
  elif spec.source == 'synthetic':
    _check_split(spec)
    return _synthetic_count(spec)
  elif spec.source == 'folder':
    n = len(_folder_index(spec)[0])
  else:
    splits = _tfds_builder(spec).info.splits
    try:
      return int(splits[_sliced_split(spec)].num_examples)
    except KeyError:
      # No split metadata (tfds.testing.mock_data, or a prepared dataset without it): count.
      ds = _tfds_raw(spec, 0, 1, None).map(lambda x, y: y)
      return int(ds.reduce(np.int64(0), lambda c, _: c + 1))
  return n if spec.max_examples < 0 else min(n, spec.max_examples)


def _process(process_index, process_count, global_batch: int) -> tuple[int, int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} not in [0, {count}).')
  if global_batch <= 0 or global_batch % count:
    raise ValueError(
      f'global batch {global_batch} is not a positive multiple of the process count ({count}).'
    )
  return index, count, global_batch // count


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.autotune.enabled = True
  # Host RAM is shared with the accelerator's feeding: cap what autotuned buffers may take.
  options.autotune.ram_budget = 4 << 30
  return options


def eval_batches(
  spec: EvalData,
  global_batch: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of every global batch of the un-augmented split, padded.

  Every process yields the same number of batches, `ceil(ceil(N / processes) / local)`, each
  with `local = global_batch / processes` rows; rows past the end of a shard are zeros with
  `valid=False`.

  Yields:
    {'image': float32 [local, S, S, 3], 'label': int32 [local], 'valid': bool [local]}.
  """
  index, count, local = _process(process_index, process_count, global_batch)
  n = num_examples(spec)
  if n == 0:
    raise ValueError(f'{spec.source} {spec.name!r} split {spec.split!r} has no examples.')
  steps = math.ceil(math.ceil(n / count) / local)
  size = spec.image_size
  ds = _raw(spec, index, count).map(
    lambda x, y: (eval_transform(x, size, spec.resize_ratio, spec.center_crop), y, True),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  pad = tf.data.Dataset.from_tensors(
    (tf.zeros([size, size, 3]), tf.constant(0, tf.int32), False)
  ).repeat()
  ds = ds.concatenate(pad).take(steps * local).batch(local, drop_remainder=True)
  for image, label, valid in ds.with_options(_options()).prefetch(2).as_numpy_iterator():
    yield {'image': image, 'label': label, 'valid': valid}


def train_batches(
  spec: EvalData,
  global_batch: int,
  crop_scale=(0.08, 1.0),
  flip: bool = True,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of every global training batch: shuffled, augmented, endless.

  Each epoch is reshuffled; the augmentation of the i-th example this process reads is keyed
  on (seed, process, i), so a rerun with the same seed sees the same crops.

  Yields:
    {'image': float32 [local, S, S, 3], 'label': int32 [local]}.
  """
  index, count, local = _process(process_index, process_count, global_batch)
  ds = _raw(spec, index, count, shuffle_seed=seed + 1)
  ds = ds.repeat().shuffle(_SHUFFLE_BUFFER, seed=seed + 7919 * index).enumerate()
  size = spec.image_size

  def augment(i, example):
    image, label = example
    key = tf.stack([tf.constant(seed * 1_000_003 + index, tf.int64), i])
    return train_transform(image, key, size, crop_scale, flip), label

  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(local, drop_remainder=True)
  for image, label in ds.with_options(_options()).prefetch(2).as_numpy_iterator():
    yield {'image': image, 'label': label}
