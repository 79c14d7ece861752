"""The sources: digits splits, synthetic examples, folder listings, tfds, start-up errors."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from stop_jax.data import masking, sources, train_stream
from tests.data.conftest import NUM_CLASSES, NUM_TRAIN, NUM_VAL, small_config


def test_digits_splits_are_fixed_and_disjoint():
  raw = sources.digits_splits()
  assert raw['train'][0].shape == (1437, 8, 8) and raw['test'][0].shape == (360, 8, 8)
  seen = {row.tobytes() for row in raw['train'][0]}
  assert not any(row.tobytes() in seen for row in raw['test'][0])
  up = sources.upscale_digits(tf.constant(raw['test'][0][:2]), 16, 'bicubic').numpy()
  assert up.shape == (2, 16, 16, 3) and up.min() >= 0.0 and up.max() <= 1.0
  with pytest.raises(ValueError, match="digits_upscale='nearest'"):
    sources.upscale_digits(tf.constant(raw['test'][0][:2]), 16, 'nearest')


def test_synthetic_sources_are_fixed_per_split_and_index():
  key = sources.synthetic_split_key('train')
  assert key == sources.synthetic_split_key('train') != sources.synthetic_split_key('test')
  a, b = sources.synthetic_image(key, 3, 32), sources.synthetic_image(key, 4, 32)
  assert a.shape == (8, 8, 3)  # low resolution, enlarged by the crop
  np.testing.assert_array_equal(a, sources.synthetic_image(key, 3, 32))
  assert not np.array_equal(a, b)
  assert 0 <= int(sources.synthetic_label(key, 3)) < sources.SYNTHETIC_NUM_CLASSES
  # The labelled synthetic data: label i % 10, a mean colour that grows with the label.
  image, label = sources.labelled_synthetic_example(key, tf.constant(13, tf.int64))
  assert image.shape == (48, 48, 3) and int(label) == 3
  means = [
    float(tf.reduce_mean(sources.labelled_synthetic_example(key, tf.constant(i, tf.int64))[0]))
    for i in (0, 9)
  ]
  assert means[0] < means[1]


def test_num_train_examples_sources_and_override():
  assert sources.num_train_examples(small_config('synthetic')) == 1_281_167
  assert sources.num_train_examples(small_config('digits', num_train_examples=1000)) == 1000


def test_folder_listing_labels_and_subset(files):
  paths, labels = sources.folder_files(files.root, 'val', 'train')
  assert len(paths) == NUM_VAL and labels.dtype == np.int32
  # Sorted classes give the labels; files come sorted by class, then name.
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  assert sources.folder_classes(files.root, 'train') == ('class_0', 'class_1', 'class_2')
  paths, labels = sources.folder_files(files.root, 'train', 'train')
  sub_paths, sub_labels = sources.folder_subset(paths, labels, 12)
  again, _ = sources.folder_subset(paths, labels, 12)
  assert len(sub_paths) == 12 and len(set(sub_labels)) == NUM_CLASSES  # not just class 0
  np.testing.assert_array_equal(sub_paths, again)
  assert len(sources.folder_subset(paths, labels, None)[0]) == NUM_TRAIN


def test_folder_to_tfds_keeps_files_and_labels(files):
  builder = sources.tfds_builder(files.name, files.tfds_dir)
  assert builder.info.splits['train'].num_examples == NUM_TRAIN
  assert len(builder.info.splits['train'].file_instructions) == 3  # the shards
  ds = builder.as_dataset(split='val', decoders={'image': tfds.decode.SkipDecoding()})
  by_name = {ex['file_name'].numpy().decode(): int(ex['label']) for ex in ds}
  paths, labels = sources.folder_files(files.root, 'val', 'train')
  assert by_name == {p.rsplit('/', 1)[1]: int(y) for p, y in zip(paths, labels, strict=True)}


def test_tfds_not_prepared_fails_at_start_with_instructions(tmp_path):
  spec = masking.spec_from_config(small_config())
  config = small_config('tfds', name='cifar10', data_dir=str(tmp_path))
  with pytest.raises(
    sources.DatasetNotReadyError, match=f'tfds build cifar10 --data_dir={tmp_path}'
  ):
    train_stream.create_train_iterator(config, spec)
  with pytest.raises(sources.DatasetNotReadyError, match='tfds build cifar10'):
    sources.num_train_examples(config)
  # The mock with no metadata behaves like a dataset that was never built.
  policy = tfds.testing.MockPolicy.USE_FILES
  with tfds.testing.mock_data(num_examples=4, policy=policy, data_dir=str(tmp_path)):
    with pytest.raises(sources.DatasetNotReadyError, match='tfds build cifar10'):
      train_stream.create_train_iterator(config, spec)
  config.data.name = 'imagenet2012'
  with pytest.raises(sources.DatasetNotReadyError, match='manual_dir'):
    train_stream.create_train_iterator(config, spec)
  config.data.name = 'no_such_dataset_xyz'
  with pytest.raises(sources.DatasetNotReadyError, match='not a known tfds dataset'):
    train_stream.create_train_iterator(config, spec)


def test_missing_or_empty_folder_fails_at_start(tmp_path):
  spec = masking.spec_from_config(small_config())
  config = small_config('folder', data_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(sources.DatasetNotReadyError, match='does not exist'):
    train_stream.create_train_iterator(config, spec)
  config.data.data_dir = str(tmp_path)
  (tmp_path / 'train').mkdir()
  with pytest.raises(sources.DatasetNotReadyError, match='no class directories'):
    sources.num_train_examples(config)
  (tmp_path / 'train' / 'n01440764').mkdir()
  (tmp_path / 'train' / 'n01440764' / 'notes.txt').write_text('not an image')
  sources.folder_classes.cache_clear()
  with pytest.raises(sources.DatasetNotReadyError, match='one directory per class'):
    train_stream.create_train_iterator(config, spec)


def _folder_with_strays(root):
  """2 classes of 3 PNGs, plus a note, a hidden file and a sub-directory in class `a`."""
  for name in ('a', 'b'):
    os.makedirs(os.path.join(root, 'train', name))
    for i in range(3):
      with open(os.path.join(root, 'train', name, f'{i}.png'), 'wb') as f:
        f.write(tf.io.encode_png(np.full((4, 4, 3), i, np.uint8)).numpy())
  for stray in ('notes.txt', '.DS_Store'):
    open(os.path.join(root, 'train', 'a', stray), 'w').close()
  os.makedirs(os.path.join(root, 'train', 'a', 'extra'))


def test_folder_census_counts_and_names_the_ignored_files(tmp_path, caplog):
  root = str(tmp_path)
  _folder_with_strays(root)
  with caplog.at_level(logging.WARNING):
    paths, _ = sources.folder_files(root, 'train', 'train')
  assert len(paths) == 6
  census = sources.folder_census(root, 'train')
  assert census == {
    'files': 9,
    'images': 6,
    'ignored': 3,
    'ignored_examples': ['a/.DS_Store', 'a/extra', 'a/notes.txt'],
  }
  warned = ' '.join(r.getMessage() for r in caplog.records)
  assert '3 of 9 files ignored' in warned and 'a/notes.txt' in warned
  # The plan's per-split counts: the eval split 'val' does not exist and is left out.
  config = small_config('folder', data_dir=root, train_split='train', eval_split='val')
  assert sources.split_counts(config) == {'train': census}
  digits = sources.split_counts(small_config('digits', train_split='train', eval_split='test'))
  assert digits == {'train': {'examples': 1437}, 'test': {'examples': 360}}
