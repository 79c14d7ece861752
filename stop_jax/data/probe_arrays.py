"""The trainer's probe data: splits of the run's own data (config.data), whole, in memory.

Un-augmented and normalised, read alike by every process; the in-training probes (logistic
regression, k-NN on the run's data) fit on them. Images are resized as in evaluation (shorter side
to image_size * 256/224, central crop), with config.data.interpolation.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from stop_jax.data import augment, decode, keys, shapes, sources


def digits_arrays(split: str, size: int, upscale: str, limit: int | None):
  """Normalised float32 [N, S, S, 3] and int32 [N] of the digits split (its first `limit`)."""
  splits = sources.digits_splits()
  if split not in splits:
    raise ValueError(f'digits has splits {sorted(splits)}, not {split!r}.')
  gray, labels = (a[:limit] for a in splits[split])
  images = augment.normalise(sources.upscale_digits(tf.constant(gray), size, upscale)).numpy()
  return images.astype(np.float32), labels.astype(np.int32)


def _probe_examples(config, split: str, limit: int | None) -> tf.data.Dataset:
  """(image float [S, S, 3] in [0, 1], ok, (int32 label, key)) of synthetic / shapes / folder /
  tfds (shapes: the task config.data.shapes_label, rendered at S).

  ok=False where the image could not be decoded (its image is zeros).
  """
  size, method = config.model.image_size, config.data.interpolation
  fallback = tf.zeros([size, size, 3])
  if config.data.source == 'synthetic':
    n = sources.SYNTHETIC_NUM_EXAMPLES if limit is None else limit
    key = sources.synthetic_split_key(split)
    return tf.data.Dataset.range(n).map(
      lambda i: (
        augment.resize(sources.synthetic_image(key, i, size), size, method, antialias=False),
        True,
        (sources.synthetic_label(key, i), ''),
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  if config.data.source == 'shapes':
    task = shapes.TASKS.index(config.data.shapes_label)
    n = min(shapes.split_size(split), limit or shapes.split_size(split))
    return tf.data.Dataset.range(n).map(
      lambda i: (lambda image, y: (image, True, (y[task], '')))(*shapes.tf_example(split, i, size)),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  center = lambda data: augment.center_crop_resize(  # noqa: E731
    decode.decode_full(data), size, augment.EVAL_RESIZE_RATIO, method
  )
  if config.data.source == 'folder':
    paths, labels = sources.folder_subset(*sources.folder_split(config, split), limit)
    return decode.safely_interleave(
      tf.data.Dataset.from_tensor_slices((paths, labels)),
      lambda path, label: center(tf.io.read_file(path)),
      fallback,
      lambda path, label: (label, path),
    )
  name, data_dir = config.data.name, config.data.data_dir
  builder = sources.tfds_builder(name, data_dir)
  read_config = tfds.ReadConfig(
    options=keys.deterministic_options(), try_autocache=False, add_tfds_id=True
  )
  decoders = {'image': tfds.decode.SkipDecoding()}
  ds = sources.tfds_dataset(
    builder,
    name,
    data_dir,
    split,
    'config.data.',
    shuffle_files=False,
    read_config=read_config,
    decoders=decoders,
  )
  sources.check_image_feature(builder, name)
  if limit is not None:
    ds = ds.take(limit)
  return decode.safely_interleave(
    ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32), ex['tfds_id'])),
    lambda data, label, key: center(data),
    fallback,
    lambda data, label, key: (label, key),
  )


def load_eval_arrays(
  config: ml_collections.ConfigDict, split: str, max_examples: int
) -> tuple[np.ndarray, np.ndarray]:
  """Un-augmented probe data: float32 images [N, S, S, 3] (normalised) and int32 labels [N].

  digits: split 'train' or 'test' (the fixed held-out split). tfds and folder: 'train' / 'test'
  mean config.data.train_split / eval_split, other names are splits of the source; every process
  reads the same examples: tfds the first max_examples of the split (tfds splits are shuffled
  when prepared), folder a fixed random subset of max_examples (a folder lists by class).
  max_examples < 0: all. Undecodable images are left out with a warning. synthetic: the
  pretraining noise with its random labels. Images are resized as in evaluation (shorter side to
  image_size * 256/224, central crop) with config.data.interpolation.
  """
  limit = None if max_examples < 0 else int(max_examples)
  size, source = config.model.image_size, config.data.source
  if source == 'digits':
    return digits_arrays(split, size, config.data.digits_upscale, limit)
  if source in ('folder', 'tfds'):
    split = {'train': config.data.train_split, 'test': config.data.eval_split}.get(split, split)
  ds = _probe_examples(config, split, limit)
  ds = ds.map(lambda image, ok, kept: (augment.normalise(image), ok, kept[0], kept[1]))
  ds = ds.with_options(keys.deterministic_options()).batch(256).prefetch(2)
  images, labels, bad = [], [], []
  for x, ok, y, example_keys in ds.as_numpy_iterator():
    images.append(x[ok])
    labels.append(y[ok])
    bad += [k.decode('utf-8', 'replace') for k in example_keys[~ok]]
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
