"""The trainer's probe arrays: digits splits, folder and tfds splits, corrupt files left out.

`tfds.testing.mock_data` serves this path: it replaces `as_dataset` and ignores split slices,
so it cannot stand in for the sharded TFRecord reader of the training stream.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from stop_jax.data import probe_arrays, sources
from tests.data.conftest import (
  NUM_CLASSES,
  NUM_VAL,
  file_config,
  image_ids,
  pixels,
  small_config,
)


def test_digits_splits_fixed_disjoint_and_deterministic():
  config = small_config()
  train_x, train_y = probe_arrays.load_eval_arrays(config, 'train', -1)
  test_x, test_y = probe_arrays.load_eval_arrays(config, 'test', -1)
  assert train_x.shape == (1437, 32, 32, 3) and test_x.shape == (360, 32, 32, 3)
  assert train_x.dtype == np.float32 and train_y.dtype == np.int32
  assert set(train_y) == set(test_y) == set(range(10))
  raw = sources.digits_splits()
  seen = {row.tobytes() for row in raw['train'][0]}
  assert not any(row.tobytes() in seen for row in raw['test'][0])
  config.seed = 123  # The held-out split must not depend on the run seed.
  again_x, again_y = probe_arrays.load_eval_arrays(config, 'test', 100)
  np.testing.assert_array_equal(again_x, test_x[:100])
  np.testing.assert_array_equal(again_y, test_y[:100])
  assert sources.num_train_examples(config) == 1437
  with pytest.raises(ValueError, match="digits has splits \\['test', 'train'\\], not 'val'"):
    probe_arrays.load_eval_arrays(config, 'val', 3)


def test_folder_eval_arrays_labels_and_subset(files):
  config = file_config(files, 'folder')
  images, labels = probe_arrays.load_eval_arrays(config, 'test', -1)  # the 'val' directory
  assert images.shape == (NUM_VAL, 32, 32, 3) and images.dtype == np.float32
  # Sorted classes give the labels; files come sorted by class, then name.
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(image_ids({'image': images}), [0, 3, 6, 1, 4, 7, 2, 5, 8])
  subset_x, subset_y = probe_arrays.load_eval_arrays(config, 'train', 12)
  again_x, _ = probe_arrays.load_eval_arrays(config, 'train', 12)
  assert subset_x.shape[0] == 12 and len(set(subset_y)) == NUM_CLASSES  # not just class 0
  np.testing.assert_array_equal(subset_x, again_x)


def test_tfds_eval_arrays_from_generated_dataset(files):
  config = file_config(files, 'tfds')
  images, labels = probe_arrays.load_eval_arrays(config, 'test', 5)
  assert images.shape == (5, 32, 32, 3) and labels.dtype == np.int32
  # folder_to_tfds keeps the labels: image i is in class i % 3.
  np.testing.assert_array_equal(image_ids({'image': images}) % NUM_CLASSES, labels)


@pytest.mark.parametrize('source', ['folder', 'tfds'])
def test_corrupt_images_are_left_out(corrupt_files, source):
  config = file_config(corrupt_files, source, batch=7)
  images, labels = probe_arrays.load_eval_arrays(config, 'test', -1)
  assert images.shape == (NUM_VAL, 32, 32, 3) and len(labels) == NUM_VAL  # the bad one left out


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])  # png / jpeg
def test_tfds_mock_eval_arrays(name, tmp_path):
  config = small_config('tfds', name=name, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=10):
    images, labels = probe_arrays.load_eval_arrays(config, 'test', 6)
  assert images.shape == (6, 32, 32, 3) and labels.shape == (6,)
  p = pixels(images)
  assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5 and p.std() > 0.05


def test_synthetic_eval_arrays_are_the_pretraining_noise():
  config = small_config('synthetic')
  images, labels = probe_arrays.load_eval_arrays(config, 'test', 4)
  again, _ = probe_arrays.load_eval_arrays(config, 'test', 4)
  assert images.shape == (4, 32, 32, 3) and labels.dtype == np.int32
  assert (labels >= 0).all() and (labels < sources.SYNTHETIC_NUM_CLASSES).all()
  np.testing.assert_array_equal(images, again)
