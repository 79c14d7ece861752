"""Labelled data for evaluation: images and class labels, in batches.

One spec (`EvalData`) names a split of a source (`sources`); two streams read it, each returning
this process's share of every global batch (per-process sharding, so a multi-host evaluation
reads each example once):

- `eval_batches`: un-augmented images (`augment.eval_transform`: shorter side to
  `image_size * resize_ratio`, central crop), in file order, padded to whole batches with
  `valid=False` rows so every process runs the same number of steps with one static shape.
- `train_batches`: the VISSL linear-probe augmentation (`augment.train_transform`:
  RandomResizedCrop + horizontal flip), shuffled, repeated forever, whole batches only.

Pixels are normalised with the ImageNet mean/std, as in pretraining.

Labels: the tfds `label` feature, or the VTAB definitions on CLEVR (`clevr_count`: number of
objects minus 3, 8 classes; `clevr_distance`: the depth of the closest object binned by VTAB's
thresholds, 6 classes). VTAB evaluates CLEVR on tfds `validation` (its test split has no scene
annotations).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from stop_jax import config as config_lib
from stop_jax.data import augment, decode, keys, probe_arrays, shapes, sources
from stop_jax.runtime import fileio

SOURCES = config_lib.EVAL_SOURCES
LABELS = config_lib.EVAL_LABELS
# VTAB `clevr(task="closest_object_distance")`: label = index of the largest threshold below the
# closest object's depth (`pixel_coords[:, 2]`), giving 6 roughly balanced classes.
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
CLEVR_COUNT_MIN_OBJECTS = 3  # CLEVR scenes hold 3..10 objects: 8 classes.
_NUM_CLASSES_OF_LABEL = {'clevr_count': 8, 'clevr_distance': 6}

DIGITS_NUM_CLASSES = 10
_SHUFFLE_BUFFER = 10_000
_PREFIX = 'EvalData.'  # How error messages name the spec's settings.


@dataclasses.dataclass(frozen=True)
class EvalData:
  """One split of one labelled image source.

  Attributes:
    source: tfds | folder | digits | synthetic | shapes.
    name: tfds dataset name (source=tfds; may carry a config, e.g. 'imagenet2012_subset/1pct').
    data_dir: tfds data_dir ('' = default), or the root of `<root>/<split>/<class>/<image>`.
    split: split name; tfds split syntax is allowed. digits and synthetic have train / test.
    label: label | clevr_count | clevr_distance | shapes_count | shapes_dist | shapes_shape
      ('label' of source=shapes: shapes_count).
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
  resize_ratio: float = augment.EVAL_RESIZE_RATIO
  center_crop: bool = True
  max_examples: int = -1
  digits_upscale: str = 'bilinear'
  class_split: str = ''

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f'EvalData.source={self.source!r} is not allowed: one of {SOURCES}.')
    if self.label not in LABELS:
      raise ValueError(f'EvalData.label={self.label!r} is not allowed: one of {LABELS}.')
    if self.label.startswith('clevr_') and self.source != 'tfds':
      raise ValueError(f'label={self.label!r} needs source=tfds (CLEVR scene annotations).')
    if self.label.startswith('shapes_') and self.source != 'shapes':
      raise ValueError(f'label={self.label!r} needs source=shapes.')
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
  if e.source in ('digits', 'synthetic', 'shapes'):
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
  if d.source in ('digits', 'synthetic', 'shapes'):
    split = role
  else:
    split = d.train_split if role == 'train' else d.eval_split
  return EvalData(
    source=d.source,
    name=d.name,
    data_dir=d.data_dir,
    split=split,
    label=f'shapes_{d.shapes_label}' if d.source == 'shapes' else 'label',
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
# Raw per-process streams of (float image [h, w, 3] in [0, 1], int32 label).


def _tfds_builder(spec: EvalData):
  return sources.tfds_builder(spec.name, spec.data_dir, _PREFIX)


def _sliced_split(spec: EvalData) -> str:
  return spec.split if spec.max_examples < 0 else f'{spec.split}[:{spec.max_examples}]'


def _tfds_raw(spec: EvalData, index: int, count: int, shuffle_seed: int | None):
  builder = _tfds_builder(spec)
  split = tfds.even_splits(_sliced_split(spec), n=count, drop_remainder=False)[index]
  # Deterministic even when shuffled: the augmentation is keyed on the read position, so the
  # order must repeat for a rerun to see the same (image, crop) pairs.
  read_config = tfds.ReadConfig(
    options=keys.deterministic_options(), try_autocache=False, shuffle_seed=shuffle_seed
  )
  ds = sources.tfds_dataset(
    builder,
    spec.name,
    spec.data_dir,
    split,
    _PREFIX,
    shuffle_files=shuffle_seed is not None,
    read_config=read_config,
  )
  label_fn = _LABEL_FNS[spec.label]
  return ds.map(
    lambda ex: (augment.to_rgb_float(ex['image']), label_fn(ex)),
    num_parallel_calls=tf.data.AUTOTUNE,
  )


def _folder_index(spec: EvalData) -> tuple[np.ndarray, np.ndarray, int]:
  """(sorted file paths, labels, number of classes) of <data_dir>/<split>/<class>/*.

  Labels index the class_split's sorted classes.
  """
  # resolve: absolute for a local folder, unchanged for gs:// (tf.io.gfile reads both).
  root, class_split = fileio.resolve(spec.data_dir), spec.class_split or spec.split
  paths, labels = sources.folder_files(root, spec.split, class_split)
  return paths, labels, len(sources.folder_classes(root, class_split))


@functools.lru_cache(maxsize=4)
def _digits(split: str, size: int, upscale: str) -> tuple[np.ndarray, np.ndarray]:
  """The digits split as float [N, S, S, 3] in [0, 1], int32 [N].

  The probe arrays with their normalisation undone (the transforms redo it): the float32 round
  trip keeps these pixels bitwise what evaluation has always read.
  """
  images, labels = probe_arrays.digits_arrays(split, size, upscale, None)
  images = np.clip(images * np.asarray(augment.STD_RGB) + np.asarray(augment.MEAN_RGB), 0.0, 1.0)
  return images.astype(np.float32), labels


def _synthetic_count(spec: EvalData) -> int:
  if spec.max_examples > 0:
    return spec.max_examples
  counts = sources.LABELLED_SYNTHETIC_EXAMPLES
  return counts.get(spec.split, counts['test'])


def _shapes_task(spec: EvalData) -> int:
  """Index of the spec's task in `shapes.tf_example`'s labels ('label': count)."""
  name = 'count' if spec.label == 'label' else spec.label.removeprefix('shapes_')
  return shapes.TASKS.index(name)


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
    paths, labels = sources.folder_subset(paths, labels, limit)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.shard(count, index)
    return ds.map(
      lambda p, y: (
        augment.to_rgb_float(decode.decode_full(tf.io.read_file(p))),
        tf.cast(y, tf.int32),
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  _check_split(spec)
  if spec.source == 'shapes':
    task = _shapes_task(spec)
    ds = tf.data.Dataset.range(shapes.split_size(spec.split, spec.max_examples))
    return ds.shard(count, index).map(
      lambda i: (lambda image, y: (image, y[task]))(
        *shapes.tf_example(spec.split, i, spec.image_size)
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  if spec.source == 'digits':
    images, labels = _digits(spec.split, spec.image_size, spec.digits_upscale)
    ds = tf.data.Dataset.from_tensor_slices((images[:limit], labels[:limit]))
    return ds.shard(count, index)
  key = sources.synthetic_split_key(spec.split)
  ds = tf.data.Dataset.range(_synthetic_count(spec)).shard(count, index)
  return ds.map(
    lambda i: sources.labelled_synthetic_example(key, i), num_parallel_calls=tf.data.AUTOTUNE
  )


# ---------------------------------------------------------------------------------------------
# Public metadata and batch streams.


def num_classes(spec: EvalData) -> int:
  """Number of classes of the spec's labels."""
  if spec.label in _NUM_CLASSES_OF_LABEL:
    return _NUM_CLASSES_OF_LABEL[spec.label]
  if spec.source == 'digits':
    return DIGITS_NUM_CLASSES
  if spec.source == 'synthetic':
    return sources.LABELLED_SYNTHETIC_NUM_CLASSES
  if spec.source == 'shapes':
    return shapes.LABELS[shapes.TASKS[_shapes_task(spec)]]
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
  elif spec.source == 'shapes':
    _check_split(spec)
    return shapes.split_size(spec.split, spec.max_examples)
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


def _memory_options() -> tf.data.Options:
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
    lambda x, y: (augment.eval_transform(x, size, spec.resize_ratio, spec.center_crop), y, True),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  pad = tf.data.Dataset.from_tensors(
    (tf.zeros([size, size, 3]), tf.constant(0, tf.int32), False)
  ).repeat()
  ds = ds.concatenate(pad).take(steps * local).batch(local, drop_remainder=True)
  for image, label, valid in ds.with_options(_memory_options()).prefetch(2).as_numpy_iterator():
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

  def augment_example(i, example):
    image, label = example
    key = tf.stack([tf.constant(seed * 1_000_003 + index, tf.int64), i])
    return augment.train_transform(image, key, size, crop_scale, flip), label

  ds = ds.map(augment_example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local, drop_remainder=True)
  for image, label in ds.with_options(_memory_options()).prefetch(2).as_numpy_iterator():
    yield {'image': image, 'label': label}
