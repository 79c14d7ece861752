"""Fine-tuning input: RandAugment's ops, random erasing, the step-indexed stream, file lists."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from stop_jax.data import finetune_input as fi
from stop_jax.data import labelled
from stop_jax.data import randaugment as ra


def _op(name, image, m, sign=1.0):
  out = ra.apply_op(tf.constant(image), tf.constant(ra.OP_NAMES.index(name)), tf.constant(m), sign)
  return out.numpy()


def _image(seed=0, size=20):
  return np.random.default_rng(seed).uniform(size=(size, size, 3)).astype(np.float32)


def test_every_op_changes_the_image_and_stays_in_range():
  image = _image()
  for name in ra.OP_NAMES:
    out = _op(name, image, 9.0)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1, name
    assert np.abs(out - image).mean() > 1e-3, name


def test_ops_by_hand():
  image = _image()
  np.testing.assert_allclose(_op('Invert', image, 0.0), 1 - image, atol=1e-6)
  np.testing.assert_allclose(_op('SolarizeIncreasing', image, 10.0), 1 - image, atol=1e-6)
  np.testing.assert_allclose(_op('SolarizeIncreasing', image, 0.0), image)  # threshold > 1
  q = np.round(image * 255).astype(int)
  np.testing.assert_allclose(
    _op('PosterizeIncreasing', image, 0.0), (q // 16 * 16) / 255, atol=1e-6
  )
  np.testing.assert_allclose(_op('PosterizeIncreasing', image, 10.0), 0.0)  # 0 bits kept
  np.testing.assert_allclose(_op('BrightnessIncreasing', image, 10.0, -1.0), 0.1 * image, atol=1e-6)
  # TranslateXRel at m=10: 0.45 * 20 = 9 px; output column x shows input column x + 9.
  out = _op('TranslateXRel', image, 10.0)
  np.testing.assert_allclose(out[:, :11], image[:, 9:], atol=1e-5)
  np.testing.assert_allclose(
    out[:, 11:], np.broadcast_to(ra.FILL_RGB, out[:, 11:].shape), atol=1e-5
  )
  # Equalize is PIL's, exactly, on uint8 levels.
  skewed = (image**3 * 255).round().astype(np.uint8)
  want = np.asarray(ImageOps.equalize(Image.fromarray(skewed))) / 255
  np.testing.assert_allclose(_op('Equalize', skewed / np.float32(255), 0.0), want, atol=1e-6)


def test_randaugment_is_keyed_on_the_seed():
  image = tf.constant(_image())
  a = ra.randaugment(image, tf.constant([1, 2], tf.int64), prob=1.0).numpy()
  b = ra.randaugment(image, tf.constant([1, 2], tf.int64), prob=1.0).numpy()
  np.testing.assert_array_equal(a, b)
  others = [
    ra.randaugment(image, tf.constant([1, s], tf.int64), prob=1.0).numpy() for s in range(3, 8)
  ]
  assert all(not np.array_equal(a, o) for o in others)
  np.testing.assert_array_equal(
    ra.randaugment(image, tf.constant([1, 2], tf.int64), num_ops=0), image
  )


def test_random_erasing_box_area():
  image = tf.zeros([30, 30, 3])
  assert np.all(ra.random_erasing(image, tf.constant([0, 1], tf.int64), 0.0).numpy() == 0)
  for s in range(10):
    out = ra.random_erasing(image, tf.constant([3, s], tf.int64), 1.0).numpy()
    erased = (out != 0).any(-1)
    rows, cols = np.where(erased)
    assert erased.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # one rectangle
    assert 0.02 * 900 * 0.5 <= erased.sum() <= 900 / 3 * 1.2


def test_train_stream_resumes_exactly_and_reshuffles_epochs():
  spec = labelled.EvalData(source='digits', split='train', image_size=16, max_examples=40)
  aug = fi.TrainAugment(image_size=16, randaug_num_ops=1, reprob=0.5)
  stream = fi.train_batches(spec, aug, 16, seed=3)
  batches = [next(stream) for _ in range(6)]  # 96 positions: over two epochs of 40
  assert batches[0]['image'].shape == (16, 16, 16, 3) and batches[0]['label'].dtype == np.int32
  resumed = next(fi.train_batches(spec, aug, 16, seed=3, start_step=4))
  np.testing.assert_array_equal(resumed['image'], batches[4]['image'])
  np.testing.assert_array_equal(resumed['label'], batches[4]['label'])
  labels = np.concatenate([b['label'] for b in batches])
  digits = labelled.EvalData(source='digits', split='train', image_size=16, max_examples=40)
  want = np.concatenate([b['label'] for b in labelled.eval_batches(digits, 40)])
  assert sorted(labels[:40]) == sorted(want) and sorted(labels[40:80]) == sorted(want)
  assert not np.array_equal(labels[:40], labels[40:80])  # another order each epoch
  # Two processes read disjoint halves that make up the split.
  halves = [
    next(fi.train_batches(spec, aug, 40, seed=3, process_index=i, process_count=2))
    for i in range(2)
  ]
  assert sorted(np.concatenate([h['label'] for h in halves])) == sorted(want)


def test_folder_with_a_file_list(tmp_path):
  for cls in ('a', 'b'):
    os.makedirs(tmp_path / 'train' / cls)
    for i in range(3):
      Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(
        tmp_path / 'train' / cls / f'{cls}{i}.png'
      )
  (tmp_path / 'list.txt').write_text('a0.png\nb/b2.png\n# a comment\n\n')
  spec = labelled.EvalData(source='folder', data_dir=str(tmp_path), split='train', image_size=8)
  assert fi.num_train_examples(spec) == 6
  assert fi.num_train_examples(spec, str(tmp_path / 'list.txt')) == 2
  batch = next(
    fi.train_batches(
      spec, fi.TrainAugment(image_size=8), 4, 0, file_list=str(tmp_path / 'list.txt')
    )
  )
  assert sorted(batch['label'].tolist()) == [0, 0, 1, 1]
  (tmp_path / 'bad.txt').write_text('zz.png\n')
  with pytest.raises(ValueError, match='none of its 1 names'):
    fi.num_train_examples(spec, str(tmp_path / 'bad.txt'))
