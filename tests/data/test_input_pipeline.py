"""Input pipeline: shapes, splits, exact resume, process sharding, augmentation, errors.

The file sources (image folder, tfds) run on generated JPEGs: a folder written here and the same
files as a real tfds dataset (`input_pipeline.folder_to_tfds`, TFRecord shards).
`tfds.testing.mock_data` serves the probe path: it replaces `as_dataset` and ignores split slices,
so it cannot stand in for the sharded TFRecord reader of the training stream.
"""

import colorsys
import io
import itertools
import logging
import math
import os
import random
import threading
import types

import jax
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from stop_jax import config as config_lib
from stop_jax.data import masking
from stop_jax.data import pipeline as input_pipeline

MEAN = np.asarray(input_pipeline.MEAN_RGB, np.float32)
STD = np.asarray(input_pipeline.STD_RGB, np.float32)


def _config(source='digits', batch=16, **data):
  c = config_lib.base_config()
  c.data.source = source
  c.model.image_size = 32
  c.model.patch_size = 4
  c.mask.min_keep = 4  # An 8x8 grid has smaller blocks than the default expects.
  c.data.global_batch_size = batch
  # Pure crops unless a test asks for more (blur would hide which digit a crop came from).
  c.data.blur_prob, c.data.grayscale_prob = 0.0, 0.0
  for k, v in data.items():
    c.data[k] = v
  return c


def _batches(config, n, start_step=0, **kwargs):
  it = input_pipeline.create_train_iterator(
    config, masking.spec_from_config(config), start_step=start_step, **kwargs
  )
  return list(itertools.islice(it, n))


def _pixels(images):
  return images * STD + MEAN  # Undo the normalisation: [0, 1] pixels.


def _upscaled_train_digits(config):
  gray = input_pipeline._digits_splits()['train'][0]
  return input_pipeline._normalise(
    input_pipeline._upscale_digits(tf.constant(gray), config)
  ).numpy()


def _match(images, refs):
  """Index of the nearest reference per image, and the largest |difference| to it."""
  x, r = images.reshape(len(images), -1), refs.reshape(len(refs), -1)
  d = (x**2).sum(1)[:, None] + (r**2).sum(1)[None] - 2 * x @ r.T
  idx = d.argmin(1)
  return idx, np.abs(x - r[idx]).max()


def test_digits_batch_shapes_and_pixels():
  config = _config(batch=16)
  spec = masking.spec_from_config(config)
  (batch,) = _batches(config, 1)
  image = batch['image']
  assert image.shape == (16, 32, 32, 3) and image.dtype == np.float32
  pixels = _pixels(image)
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  assert pixels.max() > 0.9  # Digits have bright strokes: the [0, 16] -> [0, 1] scaling holds.
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)
  assert batch['ctx_idx'].shape == (16, spec.num_context_tokens)
  assert batch['tgt_idx'].shape == (spec.num_targets, 16, spec.num_target_tokens)


def test_digits_splits_fixed_disjoint_and_deterministic():
  config = _config()
  train_x, train_y = input_pipeline.load_eval_arrays(config, 'train', -1)
  test_x, test_y = input_pipeline.load_eval_arrays(config, 'test', -1)
  assert train_x.shape == (1437, 32, 32, 3) and test_x.shape == (360, 32, 32, 3)
  assert train_x.dtype == np.float32 and train_y.dtype == np.int32
  assert set(train_y) == set(test_y) == set(range(10))
  raw = input_pipeline._digits_splits()
  seen = {row.tobytes() for row in raw['train'][0]}
  assert not any(row.tobytes() in seen for row in raw['test'][0])
  config.seed = 123  # The held-out split must not depend on the run seed.
  again_x, again_y = input_pipeline.load_eval_arrays(config, 'test', 100)
  np.testing.assert_array_equal(again_x, test_x[:100])
  np.testing.assert_array_equal(again_y, test_y[:100])
  assert input_pipeline.num_train_examples(config) == 1437


@pytest.mark.parametrize(
  'source, data',
  [
    ('digits', {}),
    # 40 examples, 24 per batch: resumed batches straddle an epoch boundary.
    ('synthetic', {'num_train_examples': 40}),
  ],
)
def test_resume_is_exact(source, data):
  config = _config(source, batch=24, **data)
  full = _batches(config, 8)
  resumed = _batches(config, 3, start_step=5)
  for a, b in zip(full[5:], resumed, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(full[5]['image'], full[6]['image'])


def test_two_processes_split_the_global_batch():
  config = _config(batch=32)
  spec = masking.spec_from_config(config)
  (whole,) = _batches(config, 1, process_index=0, process_count=1)
  halves = [_batches(config, 1, process_index=i, process_count=2)[0] for i in (0, 1)]
  assert all(h['image'].shape[0] == 16 for h in halves)
  assert not np.array_equal(halves[0]['image'], halves[1]['image'])
  # A row's image does not depend on the process count: the halves tile the global batch.
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), whole['image'])
  masks = masking.sample_masks(spec, config.seed, 0, 32)
  for i, half in enumerate(halves):
    rows = slice(16 * i, 16 * (i + 1))
    for k, v in masks.items():
      np.testing.assert_array_equal(half[k], v[:, rows] if k.startswith('tgt') else v[rows])
  with pytest.raises(ValueError, match='global_batch_size'):
    input_pipeline.create_train_iterator(_config(batch=33), spec, process_count=2)


def test_full_crop_without_flip_is_the_upscaled_digit_and_epochs_are_permutations():
  config = _config(batch=1437, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
  refs = _upscaled_train_digits(config)
  first, second = _batches(config, 2)
  idx, err = _match(first['image'], refs)
  assert err < 1e-5
  np.testing.assert_array_equal(np.sort(idx), np.arange(1437))  # Step 0 is exactly one epoch.
  idx2, err2 = _match(second['image'], refs)
  assert err2 < 1e-5 and not np.array_equal(idx, idx2)  # A fresh order each epoch.


def test_flip_mirrors_about_half_the_images():
  config = _config(batch=200, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True)
  refs = _upscaled_train_digits(config)
  (batch,) = _batches(config, 1)
  idx, err = _match(batch['image'], np.concatenate([refs, refs[:, :, ::-1]]))
  assert err < 1e-5  # Every image is a digit or its exact mirror.
  mirrored = (idx >= len(refs)).mean()
  assert 0.3 < mirrored < 0.7


def _torchvision_window(u, height, width, scale, ratio):
  """torchvision's RandomResizedCrop.get_params, fed with the given uniforms."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for a in range(10):
    target = area * (scale[0] + (scale[1] - scale[0]) * u[a])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[10 + a])
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      return [math.floor(u[20] * (height - h + 1)), math.floor(u[21] * (width - w + 1)), h, w]
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    h, w = height, round(height * max(ratio))
  else:
    w, h = width, height
  return [(height - h) // 2, (width - w) // 2, h, w]


@pytest.mark.parametrize(
  'scale, ratio', [((0.3, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (2.5, 3.0)), ((0.08, 1.0), (0.5, 2))]
)
def test_crop_windows_follow_torchvision(scale, ratio):
  rng = np.random.default_rng(0)
  shapes = [(32, 32), (375, 500), (500, 120), (40, 300), (7, 9)]
  u = rng.random((200, input_pipeline._NUM_U)).astype(np.float32)
  hw = np.asarray([random.Random(i).choice(shapes) for i in range(200)])
  got = input_pipeline._crop_windows(tf.constant(u), hw[:, 0], hw[:, 1], scale, ratio).numpy()
  want = [_torchvision_window(u[i].astype(np.float64), *hw[i], scale, ratio) for i in range(200)]
  # float32 vs float64 can flip a rounding at a .5 boundary: allow a rare off-by-one.
  assert (np.abs(got - np.asarray(want)) <= 1).all()
  assert (got == np.asarray(want)).all(1).mean() > 0.97
  assert (got[:, :2] >= 0).all() and (got[:, :2] + got[:, 2:] <= hw).all()


def test_tfds_not_prepared_fails_at_start_with_instructions(tmp_path):
  spec = masking.spec_from_config(_config())
  config = _config('tfds', name='cifar10', data_dir=str(tmp_path))
  with pytest.raises(
    input_pipeline.DatasetNotReadyError, match=f'tfds build cifar10 --data_dir={tmp_path}'
  ):
    input_pipeline.create_train_iterator(config, spec)
  with pytest.raises(input_pipeline.DatasetNotReadyError, match='tfds build cifar10'):
    input_pipeline.num_train_examples(config)
  # The mock with no metadata behaves like a dataset that was never built.
  policy = tfds.testing.MockPolicy.USE_FILES
  with tfds.testing.mock_data(num_examples=4, policy=policy, data_dir=str(tmp_path)):
    with pytest.raises(input_pipeline.DatasetNotReadyError, match='tfds build cifar10'):
      input_pipeline.create_train_iterator(config, spec)
  config.data.name = 'imagenet2012'
  with pytest.raises(input_pipeline.DatasetNotReadyError, match='manual_dir'):
    input_pipeline.create_train_iterator(config, spec)
  config.data.name = 'no_such_dataset_xyz'
  with pytest.raises(input_pipeline.DatasetNotReadyError, match='not a known tfds dataset'):
    input_pipeline.create_train_iterator(config, spec)


def test_num_train_examples_sources_and_override():
  assert input_pipeline.num_train_examples(_config('synthetic')) == 1_281_167
  assert input_pipeline.num_train_examples(_config('digits', num_train_examples=1000)) == 1000


# ---------------------------------------------------------------------------------------------
# Image folder and tfds on generated JPEGs.

NUM_TRAIN, NUM_VAL, NUM_CLASSES = 40, 9, 3


def _write_image(path, pixels, fmt='jpeg'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  encode = tf.io.encode_jpeg if fmt == 'jpeg' else tf.io.encode_png
  with open(path, 'wb') as f:
    f.write(encode(pixels).numpy())


def _make_files(root, tfds_dir, name):
  """Image i is a solid gray of level 20 + 5 i (its id survives crops, flips, blur, gray).

  Sizes alternate between landscape and portrait; every fifth is a PNG named .JPEG, as
  ImageNet has, to exercise the non-JPEG decoder.
  """
  for split, n in (('train', NUM_TRAIN), ('val', NUM_VAL)):
    for i in range(n):
      shape = (60, 80, 3) if i % 2 else (90, 50, 3)
      fmt = 'png' if i % 5 == 4 else 'jpeg'
      path = os.path.join(root, split, f'class_{i % NUM_CLASSES}', f'img_{i:03d}.JPEG')
      _write_image(path, np.full(shape, 20 + 5 * i, np.uint8), fmt)
  input_pipeline.folder_to_tfds(root, tfds_dir, name, splits=('train', 'val'), num_shards=3)
  return types.SimpleNamespace(root=str(root), tfds_dir=str(tfds_dir), name=name)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  base = tmp_path_factory.mktemp('files')
  return _make_files(base / 'folder', base / 'tfds', 'generated_images')


@pytest.fixture(scope='module')
def corrupt_files(tmp_path_factory):
  """The same, plus a truncated JPEG and garbage behind a JPEG header in train, one bad in val."""
  base = tmp_path_factory.mktemp('corrupt')
  root = base / 'folder'
  for split, n in (('train', NUM_TRAIN), ('val', NUM_VAL)):
    for i in range(n):
      path = os.path.join(root, split, f'class_{i % NUM_CLASSES}', f'img_{i:03d}.JPEG')
      _write_image(path, np.full((40, 50, 3), 20 + 5 * i, np.uint8))
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
  data = tf.io.encode_jpeg(noise).numpy()
  (root / 'train' / 'class_0' / 'truncated.JPEG').write_bytes(data[: len(data) // 3])
  (root / 'train' / 'class_1' / 'garbage.JPEG').write_bytes(b'\xff\xd8\xff' + b'garbage' * 40)
  (root / 'val' / 'class_2' / 'not_an_image.JPEG').write_bytes(b'not an image')
  input_pipeline.folder_to_tfds(root, base / 'tfds', 'corrupt_images', ('train', 'val'), 3)
  return types.SimpleNamespace(root=str(root), tfds_dir=str(base / 'tfds'), name='corrupt_images')


def _file_config(files, source, batch=8, **data):
  data = {'grayscale_prob': 0.2, 'blur_prob': 0.5, **data}  # StoP's defaults
  c = _config(source, batch=batch, shuffle_window=8, eval_split='val', **data)
  c.data.data_dir = files.root if source == 'folder' else files.tfds_dir
  c.data.name = files.name
  config_lib.validate(c)
  return c


def _ids(batch):
  """Image id of every row (from its gray level) of a batch of solid images."""
  level = _pixels(batch['image']).mean(axis=(1, 2, 3)) * 255
  return np.round((level - 20) / 5).astype(int)


SOURCES = ['folder', 'tfds']


@pytest.mark.parametrize('source', SOURCES)
def test_file_sources_batches_and_epochs(files, source):
  config = _file_config(files, source)
  spec = masking.spec_from_config(config)
  batches = _batches(config, 10)
  image = batches[0]['image']
  assert image.shape == (8, 32, 32, 3) and image.dtype == np.float32
  pixels = _pixels(np.stack([b['image'] for b in batches]))
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  # Solid images stay solid through crop, flip, grayscale and blur (StoP's defaults are on).
  assert np.ptp(pixels, axis=(2, 3, 4)).max() < 0.02
  assert batches[0]['ctx_idx'].shape == (8, spec.num_context_tokens)
  assert batches[0]['tgt_idx'].shape == (spec.num_targets, 8, spec.num_target_tokens)
  ids = np.concatenate([_ids(b) for b in batches])
  first, second = ids[:NUM_TRAIN], ids[NUM_TRAIN:]
  # 5 steps of 8 are one epoch: every image exactly once, then a fresh order.
  np.testing.assert_array_equal(np.sort(first), np.arange(NUM_TRAIN))
  np.testing.assert_array_equal(np.sort(second), np.arange(NUM_TRAIN))
  assert not np.array_equal(first, second)
  assert input_pipeline.num_train_examples(config) == NUM_TRAIN


@pytest.mark.parametrize('source', SOURCES)
def test_file_sources_resume_exactly(files, source):
  config = _file_config(files, source)
  full = _batches(config, 12)
  # Step 3 starts inside a window; step 7 inside the second epoch (tfds windows are 8 records).
  for k in (3, 7):
    resumed = _batches(config, 12 - k, start_step=k)
    for a, b in zip(full[k:], resumed, strict=True):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('source', SOURCES)
def test_two_processes_read_disjoint_shards_covering_the_split(files, source):
  config = _file_config(files, source)
  seen = []
  for p in (0, 1):
    # 5 steps of 4 rows: one epoch of a tfds process's 20-example shard; for the folder, the
    # rows of one epoch of the global order.
    batches = _batches(config, 5, process_index=p, process_count=2)
    assert all(b['image'].shape[0] == 4 and b['ctx_idx'].shape[0] == 4 for b in batches)
    seen.append(np.concatenate([_ids(b) for b in batches]))
  assert len(set(seen[0])) == len(seen[0]) == 20 and len(set(seen[1])) == 20
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(NUM_TRAIN))


def _tfds_file_names(files, keys):
  """file_name features of tfds training keys `<shard file>__<record>`."""
  names = []
  for key in keys:
    shard, index = key.rsplit('__', 1)
    path = os.path.join(files.tfds_dir, files.name, '1.0.0', shard)
    record = next(iter(tf.data.TFRecordDataset(path).skip(int(index))))
    parsed = tf.io.parse_single_example(record, {'file_name': tf.io.FixedLenFeature([], tf.string)})
    names.append(parsed['file_name'].numpy().decode())
  return names


@pytest.mark.parametrize('source', SOURCES)
def test_corrupt_images_are_skipped_and_reported(corrupt_files, source, caplog):
  config = _file_config(corrupt_files, source, batch=7)
  it = input_pipeline.create_train_iterator(config, masking.spec_from_config(config))
  with caplog.at_level(logging.WARNING):
    batches = list(itertools.islice(it, 6))  # 42 rows: one epoch of 40 good + 2 corrupt files
  assert it.step == 6 and len(it.corrupt) == 2
  names = (
    [os.path.basename(k) for k in it.corrupt]
    if source == 'folder'
    else _tfds_file_names(corrupt_files, it.corrupt)
  )
  assert sorted(names) == ['garbage.JPEG', 'truncated.JPEG']
  warned = ' '.join(r.getMessage() for r in caplog.records)
  assert all(key in warned for key in it.corrupt) and 'could not be decoded' in warned
  # Each corrupt row holds another image of its batch, not a gray fill: ids stay valid.
  ids = np.concatenate([_ids(b) for b in batches])
  assert ids.min() >= 0 and ids.max() < NUM_TRAIN and len(set(ids)) == NUM_TRAIN
  images, labels = input_pipeline.load_eval_arrays(config, 'test', -1)
  assert images.shape == (NUM_VAL, 32, 32, 3) and len(labels) == NUM_VAL  # the bad one left out


def test_missing_or_empty_folder_fails_at_start(tmp_path):
  spec = masking.spec_from_config(_config())
  config = _config('folder', data_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(input_pipeline.DatasetNotReadyError, match='does not exist'):
    input_pipeline.create_train_iterator(config, spec)
  config.data.data_dir = str(tmp_path)
  (tmp_path / 'train').mkdir()
  with pytest.raises(input_pipeline.DatasetNotReadyError, match='no class directories'):
    input_pipeline.num_train_examples(config)
  (tmp_path / 'train' / 'n01440764').mkdir()
  (tmp_path / 'train' / 'n01440764' / 'notes.txt').write_text('not an image')
  input_pipeline._folder_classes.cache_clear()
  with pytest.raises(input_pipeline.DatasetNotReadyError, match='one directory per class'):
    input_pipeline.create_train_iterator(config, spec)


def test_folder_eval_arrays_labels_and_subset(files):
  config = _file_config(files, 'folder')
  images, labels = input_pipeline.load_eval_arrays(config, 'test', -1)  # the 'val' directory
  assert images.shape == (NUM_VAL, 32, 32, 3) and images.dtype == np.float32
  # Sorted classes give the labels; files come sorted by class, then name.
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(_ids({'image': images}), [0, 3, 6, 1, 4, 7, 2, 5, 8])
  subset_x, subset_y = input_pipeline.load_eval_arrays(config, 'train', 12)
  again_x, _ = input_pipeline.load_eval_arrays(config, 'train', 12)
  assert subset_x.shape[0] == 12 and len(set(subset_y)) == NUM_CLASSES  # not just class 0
  np.testing.assert_array_equal(subset_x, again_x)


def test_tfds_eval_arrays_from_generated_dataset(files):
  config = _file_config(files, 'tfds')
  images, labels = input_pipeline.load_eval_arrays(config, 'test', 5)
  assert images.shape == (5, 32, 32, 3) and labels.dtype == np.int32
  # folder_to_tfds keeps the labels: image i is in class i % 3.
  np.testing.assert_array_equal(_ids({'image': images}) % NUM_CLASSES, labels)


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])  # png / jpeg
def test_tfds_mock_eval_arrays(name, tmp_path):
  config = _config('tfds', name=name, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=10):
    images, labels = input_pipeline.load_eval_arrays(config, 'test', 6)
  assert images.shape == (6, 32, 32, 3) and labels.shape == (6,)
  pixels = _pixels(images)
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.05


# ---------------------------------------------------------------------------------------------
# Augmentations.


def test_grayscale_probability_and_equal_channels():
  def gray_rows(p):
    config = _config('synthetic', batch=200, grayscale_prob=p, blur_prob=0.0, flip=False)
    pixels = _pixels(_batches(config, 1)[0]['image'])
    equal = np.abs(pixels - pixels[..., :1]).max(axis=(1, 2, 3)) < 1e-5
    return equal, pixels

  always, _ = gray_rows(1.0)
  never, colour = gray_rows(0.0)
  some, mixed = gray_rows(0.3)
  assert always.all() and not never.any()
  assert 0.2 < some.mean() < 0.4
  # The other rows are untouched: the same crops as without grayscale.
  np.testing.assert_allclose(mixed[~some], colour[~some], atol=1e-6)


def test_gaussian_blur_matches_scipy():
  rng = np.random.default_rng(0)
  images = rng.random((3, 20, 24, 3)).astype(np.float32)
  sigma = np.asarray([0.0, 0.7, 2.0], np.float32)
  got = input_pipeline._gaussian_blur(tf.constant(images), tf.constant(sigma), 6).numpy()
  np.testing.assert_array_equal(got[0], images[0])  # sigma 0: unchanged
  for i in (1, 2):
    # Edge pixels extended (mode='nearest'), the same 6-pixel radius.
    want = scipy.ndimage.gaussian_filter(
      images[i], sigma=(sigma[i], sigma[i], 0), mode='nearest', truncate=6 / sigma[i]
    )
    np.testing.assert_allclose(got[i], want, atol=1e-5)


def _jitter_reference(image, c, strength):
  """torchvision ColorJitter (tensor semantics) with the given draws, in numpy."""
  lo, hi = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
  factors = lo + (hi - lo) * c[1:4]
  hue = 0.2 * strength * (2 * c[4] - 1)
  gray = lambda x: (x * [0.299, 0.587, 0.114]).sum(-1, keepdims=True)  # noqa: E731
  blend = lambda x, ref, f: np.clip(f * x + (1 - f) * ref, 0, 1)  # noqa: E731
  for op in np.argsort(c[5:9]):
    if op == 0:
      image = blend(image, 0.0, factors[0])
    elif op == 1:
      image = blend(image, gray(image).mean(), factors[1])
    elif op == 2:
      image = blend(image, gray(image), factors[2])
    else:
      hsv = np.asarray([colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3)])
      hsv[:, 0] = (hsv[:, 0] + hue) % 1.0
      image = np.asarray([colorsys.hsv_to_rgb(*p) for p in hsv]).reshape(image.shape)
  return image


def test_colour_jitter_matches_torchvision_semantics():
  rng = np.random.default_rng(1)
  images = rng.random((8, 6, 7, 3)).astype(np.float32)
  c = rng.random((8, input_pipeline._NUM_C)).astype(np.float32)
  c[:, input_pipeline._C_JITTER] = [0.1] * 6 + [0.95, 0.99]  # p=0.8: the last two not jittered
  c[0, 5:9] = [0.9, 0.1, 0.5, 0.3]  # hue first...
  c[1, 5:9] = [0.1, 0.5, 0.3, 0.9]  # ...and last
  got = input_pipeline._colour_jitter(tf.constant(images), tf.constant(c), 1.0, 0.8).numpy()
  for i in range(6):
    np.testing.assert_allclose(got[i], _jitter_reference(images[i], c[i], 1.0), atol=2e-5)
    assert np.abs(got[i] - images[i]).max() > 0.01
  np.testing.assert_array_equal(got[6:], images[6:])


def test_augmentation_switches_in_the_pipeline():
  def batch(**data):
    config = _config('synthetic', batch=32, flip=False, grayscale_prob=0.0, **data)
    return _pixels(_batches(config, 1)[0]['image'])

  plain = batch(blur_prob=0.0)
  blurred = batch(blur_prob=1.0, blur_sigma=(1.5, 2.0))
  jittered = batch(blur_prob=0.0, color_jitter=1.0, color_jitter_prob=1.0)

  def tv(x):  # total variation per image
    return np.abs(np.diff(x, axis=1)).mean((1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean((1, 2, 3))

  assert (tv(blurred) < tv(plain)).all()  # every image smoother, same crops
  assert tv(blurred).mean() < 0.85 * tv(plain).mean()
  np.testing.assert_allclose(blurred.mean((1, 2)), plain.mean((1, 2)), atol=0.02)
  assert (np.abs(jittered - plain).max(axis=(1, 2, 3)) > 0.01).all()
  assert jittered.min() >= -1e-5 and jittered.max() <= 1 + 1e-5


@pytest.mark.parametrize('method, pil_filter', [('bilinear', 'BILINEAR'), ('bicubic', 'BICUBIC')])
def test_random_resized_crop_resizes_like_pil(method, pil_filter):
  # A PNG decodes exactly in both libraries, so only the crop and the resize are compared.
  rng = np.random.default_rng(2)
  low = rng.random((1, 8, 10, 3)).astype(np.float32)
  smooth = tf.image.resize(low, [90, 120], method='bicubic')[0].numpy() * 255
  pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
  data = tf.io.encode_png(pixels).numpy()
  u = rng.random((4, input_pipeline._NUM_U)).astype(np.float32)
  scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
  for i in range(4):
    y, x, h, w = input_pipeline._crop_windows(tf.constant(u[i]), 90, 120, scale, ratio).numpy()
    got = input_pipeline._decode_crop(
      tf.constant(data), tf.constant(u[i]), 32, scale, ratio, method
    )
    got = np.clip(got.numpy(), 0, 255)
    crop = Image.open(io.BytesIO(data)).crop((x, y, x + w, y + h))
    want = np.asarray(crop.resize((32, 32), getattr(Image, pil_filter)), np.float32)
    other = 'BICUBIC' if pil_filter == 'BILINEAR' else 'BILINEAR'
    other = np.asarray(crop.resize((32, 32), getattr(Image, other)), np.float32)
    # PIL rounds to uint8; the other filter is clearly farther away.
    assert np.abs(got - want).mean() < 0.5 and np.abs(got - want).max() < 3.5
    assert np.abs(got - other).mean() > 2 * np.abs(got - want).mean()


# ---------------------------------------------------------------------------------------------
# Device prefetch.


def _shardings(batch_keys):
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  return {k: NamedSharding(mesh, P('data')) for k in batch_keys}


def test_prefetch_to_device_keeps_values_order_and_sharding():
  batches = [
    {'image': np.full((8, 2, 2, 3), i, np.float32), 'ctx_idx': np.arange(8) + i} for i in range(5)
  ]
  shardings = _shardings(['image', 'ctx_idx'])
  out = list(input_pipeline.prefetch_to_device(iter(batches), shardings, size=2))
  assert len(out) == 5
  for want, got in zip(batches, out, strict=True):
    for k in want:
      assert isinstance(got[k], jax.Array) and got[k].sharding == shardings[k]
      np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_prefetch_to_device_runs_ahead_and_propagates_errors():
  produced = []
  release = threading.Event()

  def source():
    for i in range(6):
      if i == 4:
        release.wait(5)
        raise RuntimeError('decoder exploded at batch 4')
      produced.append(i)
      yield {'image': np.full((8, 1), i, np.float32)}

  it = input_pipeline.prefetch_to_device(source(), _shardings(['image']), size=2)
  first = next(it)
  for _ in range(100):  # The producer runs ahead while the consumer holds batch 0.
    if len(produced) == 4:
      break
    threading.Event().wait(0.02)
  assert float(np.asarray(first['image'])[0, 0]) == 0 and len(produced) == 4
  release.set()
  assert [float(np.asarray(next(it)['image'])[0, 0]) for _ in range(3)] == [1, 2, 3]
  with pytest.raises(RuntimeError, match='exploded at batch 4'):
    next(it)


def test_prefetch_to_device_checks_arguments_and_stops_on_close():
  with pytest.raises(ValueError, match='size=0'):
    input_pipeline.prefetch_to_device(iter([]), _shardings(['image']), size=0)
  with pytest.raises(KeyError, match="no sharding for batch key\\(s\\) \\['ctx_idx'\\]"):
    next(
      input_pipeline.prefetch_to_device(
        iter([{'image': np.zeros((8, 1)), 'ctx_idx': np.zeros((8, 1))}]), _shardings(['image'])
      )
    )
  endless = ({'image': np.zeros((8, 1), np.float32)} for _ in itertools.count())
  it = input_pipeline.prefetch_to_device(endless, _shardings(['image']), size=1)
  next(it)
  it.close()
  assert not any(t.name == 'prefetch_to_device' and t.is_alive() for t in threading.enumerate())


# ---------------------------------------------------------------------------------------------
# Config checks of the data group.


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('source', 'webdataset', 'one of'),
    ('interpolation', 'nearest', 'bilinear'),
    ('blur_sigma', (0.0, 2.0), '0 < lo <= hi'),
    ('grayscale_prob', 1.5, 'probability'),
    ('color_jitter', 3.0, 'strength'),
    ('crop_ratio', (2.0, 1.0), '0 < lo <= hi'),
    ('shuffle_window', 0, '>= 1'),
  ],
)
def test_bad_data_values_fail_naming_the_key(key, value, message):
  config = _config()
  config.data[key] = value
  with pytest.raises(config_lib.ConfigError, match=f'config.data.{key}=.*{message}'):
    config_lib.validate(config)


def test_folder_source_needs_a_root():
  config = _config('folder')
  with pytest.raises(config_lib.ConfigError, match='config.data.data_dir=.*root'):
    config_lib.validate(config)
