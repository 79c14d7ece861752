"""The labelled data streams of evaluation: VTAB CLEVR labels, the padded and process-split eval
batches, the linear-probe train stream and the digits, synthetic, tfds and folder sources."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from stop_jax.data import augment, labelled, sources


def _clevr(depths):
  """A CLEVR-like example whose objects sit at the given depths."""
  n = len(depths)
  coords = tf.stack([tf.zeros([n]), tf.zeros([n]), tf.constant(depths, tf.float32)], axis=1)
  return {'objects': {'size': tf.zeros([n], tf.int64), 'pixel_coords': coords}}


@pytest.mark.parametrize('n, label', [(3, 0), (4, 1), (7, 4), (10, 7)])
def test_vtab_clevr_count_label(n, label):
  assert int(labelled.clevr_count_label(_clevr([9.0] * n))) == label


@pytest.mark.parametrize(
  'depths, label',
  [
    ([12.0, 7.5, 9.0], 0),  # closest 7.5 <= 8
    ([8.0], 0),  # bins are (lo, hi]: 8.0 still in the first
    ([8.2, 11.0], 1),
    ([9.7, 9.9], 4),
    ([10.5], 5),
    ([13.0, 30.0], 5),
  ],
)
def test_vtab_clevr_distance_label(depths, label):
  assert int(labelled.clevr_distance_label(_clevr(depths))) == label


def test_eval_batches_pad_and_split_among_processes():
  spec = labelled.EvalData('digits', split='test', image_size=16, resize_ratio=1.0)
  whole = list(labelled.eval_batches(spec, 128))
  assert len(whole) == 3  # 360 rows: 128 + 128 + 104 and 24 padding rows
  assert all(b['image'].shape == (128, 16, 16, 3) for b in whole)
  valid = np.concatenate([b['valid'] for b in whole])
  assert valid.sum() == 360 and not valid[360:].any()
  labels = np.concatenate([b['label'] for b in whole])[valid]

  shards = [list(labelled.eval_batches(spec, 128, i, 2)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3  # same step count on every process
  assert all(b['image'].shape[0] == 64 for s in shards for b in s)
  shard_labels = [np.concatenate([b['label'][b['valid']] for b in s]) for s in shards]
  assert sum(len(x) for x in shard_labels) == 360
  np.testing.assert_array_equal(np.sort(np.concatenate(shard_labels)), np.sort(labels))
  with pytest.raises(ValueError, match='not a positive multiple of the process count'):
    next(labelled.eval_batches(spec, 127, 0, 2))


def test_train_batches_shapes_and_labels():
  spec = labelled.EvalData('digits', split='train', image_size=16, resize_ratio=1.0)
  it = labelled.train_batches(spec, 64, (0.5, 1.0), False, seed=3)
  b1, b2 = next(it), next(it)
  assert b1['image'].shape == (64, 16, 16, 3) and b1['label'].dtype == np.int32
  assert set(np.unique(np.concatenate([b1['label'], b2['label']]))) <= set(range(10))
  assert not np.allclose(b1['image'], b2['image'])
  again = next(labelled.train_batches(spec, 64, (0.5, 1.0), False, seed=3))
  np.testing.assert_allclose(again['image'], b1['image'])  # seeded: reproducible


def test_tfds_source_under_mock_data():
  with tfds.testing.mock_data(num_examples=6):
    spec = labelled.EvalData('tfds', 'cifar100', split='test', image_size=16)
    assert labelled.num_classes(spec) == 100
    assert labelled.num_examples(spec) == 6
    (batch,) = list(labelled.eval_batches(spec, 8))
    assert batch['image'].shape == (8, 16, 16, 3) and batch['valid'].sum() == 6
    clevr = labelled.EvalData('tfds', 'clevr', split='validation', label='clevr_distance')
    assert labelled.num_classes(clevr) == 6


def test_bad_specs_fail_early():
  with pytest.raises(ValueError, match="source='imagefolder' is not allowed"):
    labelled.EvalData('imagefolder')
  with pytest.raises(ValueError, match='needs source=tfds'):
    labelled.EvalData('digits', label='clevr_count')
  with pytest.raises(sources.DatasetNotReadyError, match='tfds build cifar100'):
    next(
      labelled.eval_batches(
        labelled.EvalData('tfds', 'cifar100', data_dir='/nonexistent/tfds', split='test'), 8
      )
    )


def test_folder_source(tmp_path):
  for split, n in (('train', 3), ('val', 2)):
    for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
      os.makedirs(tmp_path / split / f'class{c}')
      for i in range(n):
        img = np.zeros((20, 30, 3), np.uint8) + np.asarray(colour, np.uint8)
        tf.io.write_file(str(tmp_path / split / f'class{c}' / f'{i}.png'), tf.io.encode_png(img))
  spec = labelled.EvalData('folder', data_dir=str(tmp_path), split='val', image_size=8)
  assert labelled.num_classes(spec) == 2 and labelled.num_examples(spec) == 4
  (b,) = list(labelled.eval_batches(spec, 4))
  np.testing.assert_array_equal(b['label'], [0, 0, 1, 1])
  red = (1.0 - augment.MEAN_RGB[0]) / augment.STD_RGB[0]
  np.testing.assert_allclose(b['image'][0, ..., 0], red, atol=1e-4)
  # A split missing a class keeps the train split's label indices (no silent shift).
  os.makedirs(tmp_path / 'partial' / 'class1')
  img = np.zeros((20, 30, 3), np.uint8)
  tf.io.write_file(str(tmp_path / 'partial' / 'class1' / '0.png'), tf.io.encode_png(img))
  spec = labelled.EvalData(
    'folder', data_dir=str(tmp_path), split='partial', image_size=8, class_split='train'
  )
  assert labelled.num_classes(spec) == 2
  (b,) = list(labelled.eval_batches(spec, 1))
  np.testing.assert_array_equal(b['label'], [1])
  # A limit takes a spread of classes, not the head of the class-sorted listing.
  spec = labelled.EvalData('folder', data_dir=str(tmp_path), split='train', max_examples=3)
  labels = np.concatenate([x['label'][x['valid']] for x in labelled.eval_batches(spec, 3)])
  assert len(labels) == 3 and sorted(set(labels.tolist())) == [0, 1]
