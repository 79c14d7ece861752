"""Fine-tuning input: augmented, step-indexed training batches; test batches as the probes'.

Training images get the MAE/BEiT recipe (timm's `create_transform(is_training=True)`):
RandomResizedCrop (bicubic by default), horizontal flip, RandAugment (`randaugment.py`), the
ImageNet normalisation, random erasing. Mixup / CutMix run later, on the device.

Resume is exact and cheap, as in pretraining: the stream is a function of the step. Each
process reads its shard of light items (in-memory arrays, file paths, or tfds records still
encoded), shuffled per epoch with a key of (seed, epoch), and position p of its stream is item
p mod n of epoch p div n. Every augmentation draw is keyed on (seed, process, p). A restart
at step k skips the items of the current epoch before k without decoding them.

Test images: `labelled.eval_batches` (shorter side to image_size * resize_ratio, center crop).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from stop_jax.data import augment, decode, keys, labelled, probe_arrays, randaugment, sources
from stop_jax.runtime import fileio

_PREFIX = 'config.finetune.'
# tfds records (still encoded) shuffled at once per epoch: ImageNet JPEGs average ~110 KB, so
# this bounds the buffer to ~2 GB; the 1% subset (12,811 images) fits whole.
MAX_SHUFFLE_RECORDS = 16_384
STREAM_FINETUNE = 11  # keys.make_key stream id of fine-tuning draws


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """The train-image transform (config.finetune keys of the same names)."""

  image_size: int
  crop_scale: tuple[float, float] = (0.08, 1.0)
  interpolation: str = 'bicubic'
  flip: bool = True
  randaug_num_ops: int = 2
  randaug_magnitude: float = 9.0
  randaug_magnitude_std: float = 0.5
  randaug_prob: float = 0.5
  reprob: float = 0.25

  @classmethod
  def from_config(cls, config, image_size: int) -> TrainAugment:
    f = config.finetune
    return cls(
      image_size=image_size,
      crop_scale=tuple(f.crop_scale),
      interpolation=f.interpolation,
      flip=bool(f.flip),
      randaug_num_ops=int(f.randaug_num_ops),
      randaug_magnitude=float(f.randaug_magnitude),
      randaug_magnitude_std=float(f.randaug_magnitude_std),
      randaug_prob=float(f.randaug_prob),
      reprob=float(f.reprob),
    )


def train_transform(image, seed, aug: TrainAugment):
  """float [h, w, 3] in [0, 1] -> normalised float32 [S, S, 3], every draw keyed on seed [2]."""
  crop_seed, flip_seed, ra_seed, erase_seed = tf.unstack(
    tf.random.experimental.stateless_split(seed, 4)
  )
  begin, crop_hw, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.shape(image),
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=crop_seed,
    min_object_covered=0.0,
    aspect_ratio_range=augment.CROP_RATIO,
    area_range=tuple(aug.crop_scale),
    max_attempts=augment.RRC_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  size = aug.image_size
  image = augment.resize(tf.slice(image, begin, crop_hw), size, aug.interpolation, True)
  if aug.flip:
    mirror = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(mirror, lambda: tf.reverse(image, axis=[1]), lambda: image)
  image = randaugment.randaugment(
    image,
    ra_seed,
    aug.randaug_num_ops,
    aug.randaug_magnitude,
    aug.randaug_magnitude_std,
    aug.randaug_prob,
  )
  image = augment.normalise(tf.ensure_shape(image, [size, size, 3]))
  return randaugment.random_erasing(image, erase_seed, aug.reprob)


def read_file_list(path: str) -> frozenset[str]:
  """The names in a file list (one per line; blank lines and '#' comments skipped)."""
  lines = fileio.read_text(path).splitlines()
  names = frozenset(s.strip() for s in lines if s.strip() and not s.startswith('#'))
  if not names:
    raise ValueError(f'{_PREFIX}file_list={path!r} names no images.')
  return names


def folder_items(spec: labelled.EvalData, file_list: str = '') -> tuple[np.ndarray, np.ndarray]:
  """(paths, labels) of a folder split, restricted to the file list when one is given.

  A list entry matches a file by its name ('n01440764_10026.JPEG') or by '<class>/<name>'.
  """
  paths, labels = sources.folder_files(fileio.resolve(spec.data_dir), spec.split, spec.split)
  if file_list:
    names = read_file_list(file_list)
    keep = np.asarray(
      [
        os.path.basename(p) in names or '/'.join(p.split(os.sep)[-2:]) in names
        for p in paths.tolist()
      ],
      bool,
    )
    if not keep.any():
      raise ValueError(
        f'{_PREFIX}file_list={file_list!r}: none of its {len(names)} names is an image of '
        f'{os.path.join(spec.data_dir, spec.split)}/<class>/.'
      )
    paths, labels = paths[keep], labels[keep]
  limit = None if spec.max_examples < 0 else spec.max_examples
  return sources.folder_subset(paths, labels, limit)


def _digits(split: str, size: int, upscale: str) -> tuple[np.ndarray, np.ndarray]:
  """The digits split as float [N, S, S, 3] in [0, 1] (the probe arrays, normalisation undone,
  as `labelled` reads them) and int32 labels [N]."""
  images, labels = probe_arrays.digits_arrays(split, size, upscale, None)
  images = np.clip(images * np.asarray(augment.STD_RGB) + np.asarray(augment.MEAN_RGB), 0.0, 1.0)
  return images.astype(np.float32), labels


def _light_items(spec: labelled.EvalData, file_list: str, index: int, count: int):
  """(this process's items as a tf.data.Dataset, their count, item -> (image [h,w,3] in [0,1],
  int32 label)). Items are what is cheap to shuffle and skip: no decoded pixels."""
  limit = None if spec.max_examples < 0 else spec.max_examples
  if spec.source == 'folder':
    paths, labels = folder_items(spec, file_list)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).shard(count, index)

    def load(p, y):
      return augment.to_rgb_float(decode.decode_full(tf.io.read_file(p))), tf.cast(y, tf.int32)

  elif spec.source == 'digits':
    images, labels = _digits(spec.split, spec.image_size, spec.digits_upscale)
    ds = tf.data.Dataset.from_tensor_slices((images[:limit], labels[:limit])).shard(count, index)
    load = lambda x, y: (x, y)  # noqa: E731
  elif spec.source == 'synthetic':
    n = labelled.num_examples(spec)
    ds = tf.data.Dataset.range(n).shard(count, index)
    key = sources.synthetic_split_key(spec.split)
    load = lambda i: sources.labelled_synthetic_example(key, i)  # noqa: E731
  else:
    builder = sources.tfds_builder(spec.name, spec.data_dir, _PREFIX)
    split = spec.split if limit is None else f'{spec.split}[:{limit}]'
    split = tfds.even_splits(split, n=count, drop_remainder=False)[index]
    read_config = tfds.ReadConfig(options=keys.deterministic_options(), try_autocache=False)
    ds = sources.tfds_dataset(
      builder,
      spec.name,
      spec.data_dir,
      split,
      _PREFIX,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=read_config,
    ).map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)))

    def load(data, y):
      return augment.to_rgb_float(decode.decode_full(data)), y

  n = int(ds.cardinality())
  if n < 0:  # unknown (e.g. tfds without split metadata): count the light items once
    n = int(ds.reduce(np.int64(0), lambda c, *_: c + 1))
  return ds, n, load


def num_train_examples(spec: labelled.EvalData, file_list: str = '') -> int:
  """Examples of the train split (after file_list and max_examples), all processes together."""
  if spec.source == 'folder':
    return len(folder_items(spec, file_list)[0])
  return labelled.num_examples(spec)


def train_batches(
  spec: labelled.EvalData,
  aug: TrainAugment,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  file_list: str = '',
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of the global training batches from `start_step` on, endless.

  The batch at step s is a pure function of (seed, s, process): the same whether the stream
  started at 0 or at s.

  Yields:
    {'image': float32 [local, S, S, 3] normalised, 'label': int32 [local]}.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch <= 0 or global_batch % count:
    raise ValueError(f'global batch {global_batch} is not a multiple of {count} processes.')
  local = global_batch // count
  items, n, load = _light_items(spec, file_list, index, count)
  if n == 0:
    raise ValueError(f'{spec.source} {spec.name!r} split {spec.split!r}: no examples here.')
  start = start_step * local  # this process's stream position
  buffer = min(n, MAX_SHUFFLE_RECORDS)

  def epoch(e):
    # One int64 drawn from the key of (seed, process, epoch): tf.data shuffles take one word.
    key = keys.make_key(STREAM_FINETUNE, seed, index, e)
    order_seed = tf.random.stateless_uniform([], key, None, None, tf.int64)
    shuffled = items.shuffle(buffer, seed=order_seed, reshuffle_each_iteration=False)
    return tf.data.Dataset.zip(tf.data.Dataset.range(e * n, (e + 1) * n), shuffled)

  ds = tf.data.Dataset.range(start // n, np.iinfo(np.int64).max).flat_map(epoch)
  ds = ds.skip(start % n)

  def example(position, item):
    image, label = load(*item) if isinstance(item, tuple) else load(item)
    seed_p = keys.make_key(STREAM_FINETUNE, seed, index, position)
    return train_transform(image, seed_p, aug), label

  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE).batch(local, drop_remainder=True)
  options = keys.deterministic_options()
  options.autotune.ram_budget = 4 << 30
  for image, label in ds.with_options(options).prefetch(2).as_numpy_iterator():
    yield {'image': image, 'label': label}
