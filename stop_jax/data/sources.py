"""The data sources, read alike by the pretraining stream and the labelled (evaluation) streams.

- digits: sklearn's 8x8 digits, split once into a fixed train (1437) / test (360) split, upscaled.
- synthetic: two generated datasets with the same split keys. Pretraining reads noise at a low
  resolution with random labels, ImageNet-1k sized (`SYNTHETIC_NUM_EXAMPLES`, 1000 classes), so
  schedules look like the real thing. The labelled streams read `labelled_synthetic_example`:
  48x48 noise whose mean colour depends on one of 10 labels, small enough to evaluate, learnable
  by a linear probe.
- shapes: the procedural CLEVR-like scenes of `shapes.py` (count / dist / shape labels), rendered
  on the fly at the size asked for (`shapes.tf_example` inside TF pipelines).
- folder: root/<split>/<class>/<image>, the layout of the official code; sorted class names
  give the labels. Files without an image extension are left out, counted and named in a
  warning (`folder_census`). `folder_to_tfds` writes such a folder as a tfds dataset.
- tfds: a prepared tfds dataset (`tfds build`); an unprepared, empty or unknown one fails at
  start with DatasetNotReadyError, whose message says how to prepare it.
"""

from __future__ import annotations

import functools
import os
import textwrap
import zlib
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from stop_jax.data import keys, shapes
from stop_jax.runtime import cli

SYNTHETIC_NUM_EXAMPLES = 1_281_167  # ImageNet-1k train, so schedules look like the real thing.
SYNTHETIC_NUM_CLASSES = 1000
LABELLED_SYNTHETIC_NUM_CLASSES = 10
LABELLED_SYNTHETIC_SIZE = 48  # Generated images are this square size before the transforms.
LABELLED_SYNTHETIC_EXAMPLES = {'train': 10_000, 'test': 2_000}
# Files an image folder may hold (matched case-insensitively; ImageNet's are `.JPEG`).
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif')


class DatasetNotReadyError(cli.UserError, RuntimeError):
  """The dataset is not prepared, empty or unknown; the message says how to prepare it."""


# digits --------------------------------------------------------------------------------------


@functools.cache
def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def upscale_digits(gray, size: int, method: str) -> tf.Tensor:
  """float [..., 8, 8] in [0, 1] -> [..., size, size, 3]; method: config.data.digits_upscale."""
  if method not in ('bilinear', 'bicubic'):
    raise ValueError(f'config.data.digits_upscale={method!r}: expected bilinear or bicubic.')
  image = tf.image.resize(gray[..., None], [size, size], method=method)
  return tf.image.grayscale_to_rgb(tf.clip_by_value(image, 0.0, 1.0))


# synthetic -----------------------------------------------------------------------------------


def synthetic_split_key(split: str) -> int:
  return zlib.crc32(split.encode())  # Stable across runs, unlike hash().


def synthetic_source_size(size: int) -> int:
  return max(8, size // 4)  # Low-resolution noise: cheap to draw, smooth once enlarged.


def synthetic_image(split_key, index, size: int) -> tf.Tensor:
  """Pretraining noise [s, s, 3] in [0, 1], s = synthetic_source_size(size); fixed per index."""
  src = synthetic_source_size(size)
  return keys.uniform([src, src, 3], keys.make_key(keys.STREAM_SYNTH_PIXELS, split_key, index))


def synthetic_label(split_key, index) -> tf.Tensor:
  """Pretraining label: int32 scalar, uniform in [0, SYNTHETIC_NUM_CLASSES), fixed per index."""
  key = keys.make_key(keys.STREAM_SYNTH_LABELS, split_key, index)
  return keys.uniform([], key, 0, SYNTHETIC_NUM_CLASSES, tf.int32)


def labelled_synthetic_example(split_key: int, i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Labelled noise (float [48, 48, 3] in [0, 1], int32 label i % 10), fixed per (split, i).

  The per-channel mean depends on the label, so a linear probe can learn it.
  """
  label = tf.cast(i % LABELLED_SYNTHETIC_NUM_CLASSES, tf.int32)
  seed = tf.stack([tf.constant(split_key, tf.int64), tf.cast(i, tf.int64)])
  size = LABELLED_SYNTHETIC_SIZE
  noise = tf.random.stateless_uniform([size, size, 3], seed)
  shift = (
    tf.cast(label, tf.float32) / LABELLED_SYNTHETIC_NUM_CLASSES * tf.constant([1.0, 0.5, 0.25])
  )
  return tf.clip_by_value(0.5 * noise + 0.5 * shift, 0.0, 1.0), label


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
def folder_classes(root: str, split: str) -> tuple[str, ...]:
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
def _class_listing(where: str, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(image files, other entries) of the class directory where/name, each sorted."""
  entries = sorted(tf.io.gfile.listdir(os.path.join(where, name)))
  images = tuple(f for f in entries if f.lower().endswith(IMAGE_EXTENSIONS))
  return images, tuple(f for f in entries if not f.lower().endswith(IMAGE_EXTENSIONS))


@functools.cache
def folder_census(root: str, split: str) -> dict:
  """What root/split holds: {'files': entries found in its class directories, 'images': those
  with an image extension (the examples), 'ignored': the others, 'ignored_examples': up to 5 of
  them as '<class>/<name>'}. Decoding is not checked here (a read of every file); images that
  fail to decode are counted by the training stream (`train_stream.CorruptImages`)."""
  where = os.path.join(root, split)
  images, ignored = 0, []
  for name in folder_classes(root, split):
    good, other = _class_listing(where, name)
    images += len(good)
    ignored += [f'{name}/{f.rstrip("/")}' for f in other]
  n, shown = len(ignored), ', '.join(ignored[:5]) + (', ...' if len(ignored) > 5 else '')
  if n:
    exts = ', '.join(IMAGE_EXTENSIONS)
    logging.warning(
      f'image folder {where}: {n} of {images + n} files ignored (not {exts}): {shown}'
    )
  return {'files': images + n, 'images': images, 'ignored': n, 'ignored_examples': ignored[:5]}


@functools.cache
def folder_files(root: str, split: str, class_split: str) -> tuple[np.ndarray, np.ndarray]:
  """Paths (str [N], sorted by class then name) and labels (int32 [N]) of root/split.

  Labels index the sorted classes of root/class_split (the train split), so train and eval
  agree even if a split misses a class.
  """
  classes = {name: i for i, name in enumerate(folder_classes(root, class_split))}
  where = os.path.join(root, split)
  paths, labels = [], []
  for name in folder_classes(root, split):
    if name not in classes:
      raise DatasetNotReadyError(
        f'image folder {where!r} has class {name!r}, which {os.path.join(root, class_split)!r} '
        'does not have: the splits must share their class directories.'
      )
    files = _class_listing(where, name)[0]
    paths += [os.path.join(where, name, f) for f in files]
    labels += [classes[name]] * len(files)
  census = folder_census(root, split)  # warns once about non-image files
  if not paths:
    raise DatasetNotReadyError(
      f'image folder {where!r} has class directories but no images '
      f'({census["ignored"]} other files, e.g. {census["ignored_examples"]}).\n'
      f'{_folder_layout_help(root, split)}'
    )
  return np.asarray(paths), np.asarray(labels, np.int32)


def folder_split(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """folder_files of a split of config.data's folder, labelled by config.data.train_split."""
  return folder_files(config.data.data_dir, split, config.data.train_split)


def folder_subset(paths, labels, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
  """A fixed random subset of `limit` examples (all if None or more), independent of any seed.

  The listing is sorted by class, so its head would miss classes.
  """
  if limit is not None and limit < len(paths):
    pick = np.sort(np.random.default_rng(0).permutation(len(paths))[:limit])
    return paths[pick], labels[pick]
  return paths, labels


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
  classes = folder_classes(root, splits[0])
  listing = {s: folder_files(root, s, splits[0]) for s in splits}
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
# `prefix` names the settings in messages: 'config.data.' (pretraining) or 'EvalData.'.


def tfds_builder(name: str, data_dir: str, prefix: str = 'config.data.'):
  """The tfds builder of dataset `name` in data_dir ('' = the tfds default)."""
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.DatasetNotFoundError as e:
    raise DatasetNotReadyError(
      f'{prefix}name={name!r} is not a known tfds dataset, and '
      f'{data_dir or "the tfds data_dir"} holds no prepared dataset of that name.'
    ) from e


def not_ready_message(builder, name: str, data_dir: str, prefix: str = 'config.data.') -> str:
  """How to prepare dataset `name`: the tfds command, and the manual download steps if any."""
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
    msg += f'\nand set {prefix}data_dir=<dir>.'
  return msg


def _not_ready(builder, name, data_dir, prefix, error: Exception) -> DatasetNotReadyError:
  # tfds's own first line says which of (unprepared, bad split, ...) it was.
  cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  message = not_ready_message(builder, name, data_dir, prefix)
  return DatasetNotReadyError(f'{message}\n(tfds: {cause})')


def tfds_dataset(builder, name: str, data_dir: str, split, prefix: str, **kwargs):
  """builder.as_dataset(split=split, **kwargs), a missing preparation as one clear error."""
  try:
    return builder.as_dataset(split=split, **kwargs)
  except (AssertionError, ValueError, KeyError, FileNotFoundError, tf.errors.NotFoundError) as e:
    raise _not_ready(builder, name, data_dir, prefix, e) from e


def check_image_feature(builder, name: str, prefix: str = 'config.data.'):
  """Fails unless the dataset has an encoded Image feature named 'image'."""
  feature = builder.info.features
  if 'image' not in feature or not isinstance(feature['image'], tfds.features.Image):
    raise ValueError(
      f'{prefix}name={name!r}: expected an encoded tfds Image feature named '
      f"'image'; the features are {sorted(feature.keys())}."
    )


def tfds_shard(config, process_index: int, process_count: int):
  """This process's even split of the train split: (builder, files, skips, takes), as numpy.

  files str [F]; skips / takes int64 [F]: read records [skip, skip + take) of each file.
  """
  name, data_dir = config.data.name, config.data.data_dir
  builder = tfds_builder(name, data_dir)
  split = tfds.even_splits(config.data.train_split, n=process_count)[process_index]
  try:
    instructions = builder.info.splits[split].file_instructions
  except (KeyError, ValueError, AssertionError) as e:
    raise _not_ready(builder, name, data_dir, 'config.data.', e) from e
  check_image_feature(builder, name)
  file_format = str(getattr(builder.info, 'file_format', 'tfrecord')).lower()
  if 'tfrecord' not in file_format:
    raise ValueError(
      f'config.data.name={name!r} is stored as {file_format}; the training reader '
      f'reads TFRecord shards. Prepare it with `tfds build {name} --file_format=tfrecord`.'
    )
  files = np.asarray([str(i.filename) for i in instructions])
  skips = np.asarray([i.skip for i in instructions], np.int64)
  takes = np.asarray([i.take for i in instructions], np.int64)
  if takes.sum() <= 0:
    raise DatasetNotReadyError(
      f'tfds split {config.data.train_split!r} of {name!r} has no examples for '
      f'process {process_index} of {process_count}.\n'
      f'{not_ready_message(builder, name, data_dir)}'
    )
  for f in {files[0], files[-1]}:  # Cheap check that the shards are where the metadata says.
    if not tf.io.gfile.exists(f):
      raise DatasetNotReadyError(
        f'tfds shard {f} is missing (metadata found, data files not).\n'
        f'{not_ready_message(builder, name, data_dir)}'
      )
  return builder, files, skips, takes


def split_counts(config: ml_collections.ConfigDict) -> dict:
  """Per split of config.data (train, and eval where it exists): what the source holds.

  folder: `folder_census` (files found, images, non-image files ignored); tfds: the examples of
  the prepared split's metadata; digits / synthetic: their examples. For the plan (plan.json).
  """
  data, counts = config.data, {}
  for split in dict.fromkeys((data.train_split, data.eval_split)):
    is_train = split == data.train_split
    if data.source == 'folder':
      try:
        counts[split] = dict(folder_census(data.data_dir, split))
      except DatasetNotReadyError:
        if is_train:
          raise
    elif data.source == 'tfds':
      splits = tfds_builder(data.name, data.data_dir).info.splits
      if split in splits:
        counts[split] = {'examples': int(splits[split].num_examples)}
    elif data.source == 'digits' and split in digits_splits():
      counts[split] = {'examples': len(digits_splits()[split][1])}
    elif data.source == 'synthetic' and is_train:
      counts[split] = {'examples': SYNTHETIC_NUM_EXAMPLES}
  return counts


def num_train_examples(config: ml_collections.ConfigDict) -> int:
  """Examples per epoch: config.data.num_train_examples if > 0, else the source's size."""
  if config.data.num_train_examples > 0:
    return int(config.data.num_train_examples)
  source = config.data.source
  if source == 'digits':
    return len(digits_splits()['train'][1])
  if source == 'synthetic':
    return SYNTHETIC_NUM_EXAMPLES
  if source == 'shapes':
    return shapes.split_size(config.data.train_split)
  if source == 'folder':
    return len(folder_split(config, config.data.train_split)[0])
  builder = tfds_builder(config.data.name, config.data.data_dir)
  try:
    return int(builder.info.splits[config.data.train_split].num_examples)
  except KeyError as e:
    raise DatasetNotReadyError(
      not_ready_message(builder, config.data.name, config.data.data_dir)
    ) from e
