"""The pretraining stream: shapes, epochs, exact resume, process sharding, corrupt files."""

import itertools
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from stop_jax import config as config_lib
from stop_jax.data import augment, masking, sources, train_stream
from tests.data.conftest import (
  NUM_TRAIN,
  batches,
  file_config,
  image_ids,
  pixels,
  small_config,
)


def _upscaled_train_digits(config):
  gray = sources.digits_splits()['train'][0]
  size, method = config.model.image_size, config.data.digits_upscale
  return augment.normalise(sources.upscale_digits(tf.constant(gray), size, method)).numpy()


def _match(images, refs):
  """Index of the nearest reference per image, and the largest |difference| to it."""
  x, r = images.reshape(len(images), -1), refs.reshape(len(refs), -1)
  d = (x**2).sum(1)[:, None] + (r**2).sum(1)[None] - 2 * x @ r.T
  idx = d.argmin(1)
  return idx, np.abs(x - r[idx]).max()


def test_digits_batch_shapes_and_pixels():
  config = small_config(batch=16)
  spec = masking.spec_from_config(config)
  (batch,) = batches(config, 1)
  image = batch['image']
  assert image.shape == (16, 32, 32, 3) and image.dtype == np.float32
  p = pixels(image)
  assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5
  assert p.max() > 0.9  # Digits have bright strokes: the [0, 16] -> [0, 1] scaling holds.
  np.testing.assert_allclose(p[..., 0], p[..., 1], atol=1e-5)
  np.testing.assert_allclose(p[..., 0], p[..., 2], atol=1e-5)
  assert batch['ctx_idx'].shape == (16, spec.num_context_tokens)
  assert batch['tgt_idx'].shape == (spec.num_targets, 16, spec.num_target_tokens)


@pytest.mark.parametrize(
  'source, data',
  [
    ('digits', {}),
    # 40 examples, 24 per batch: resumed batches straddle an epoch boundary.
    ('synthetic', {'num_train_examples': 40}),
  ],
)
def test_resume_is_exact(source, data):
  config = small_config(source, batch=24, **data)
  full = batches(config, 8)
  resumed = batches(config, 3, start_step=5)
  for a, b in zip(full[5:], resumed, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(full[5]['image'], full[6]['image'])


def test_two_processes_split_the_global_batch():
  config = small_config(batch=32)
  spec = masking.spec_from_config(config)
  (whole,) = batches(config, 1, process_index=0, process_count=1)
  halves = [batches(config, 1, process_index=i, process_count=2)[0] for i in (0, 1)]
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
    train_stream.create_train_iterator(small_config(batch=33), spec, process_count=2)


def test_full_crop_without_flip_is_the_upscaled_digit_and_epochs_are_permutations():
  config = small_config(batch=1437, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
  refs = _upscaled_train_digits(config)
  first, second = batches(config, 2)
  idx, err = _match(first['image'], refs)
  assert err < 1e-5
  np.testing.assert_array_equal(np.sort(idx), np.arange(1437))  # Step 0 is exactly one epoch.
  idx2, err2 = _match(second['image'], refs)
  assert err2 < 1e-5 and not np.array_equal(idx, idx2)  # A fresh order each epoch.


def test_flip_mirrors_about_half_the_images():
  config = small_config(batch=200, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True)
  refs = _upscaled_train_digits(config)
  (batch,) = batches(config, 1)
  idx, err = _match(batch['image'], np.concatenate([refs, refs[:, :, ::-1]]))
  assert err < 1e-5  # Every image is a digit or its exact mirror.
  mirrored = (idx >= len(refs)).mean()
  assert 0.3 < mirrored < 0.7


# ---------------------------------------------------------------------------------------------
# Image folder and tfds on generated images.

SOURCES = ['folder', 'tfds']
SLOW_SOURCES = [pytest.param(s, marks=pytest.mark.slow) for s in SOURCES]


@pytest.mark.parametrize('source', SOURCES)
def test_file_sources_batches_and_epochs(files, source):
  config = file_config(files, source)
  spec = masking.spec_from_config(config)
  got = batches(config, 10)
  image = got[0]['image']
  assert image.shape == (8, 32, 32, 3) and image.dtype == np.float32
  p = pixels(np.stack([b['image'] for b in got]))
  assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5
  # Solid images stay solid through crop, flip, grayscale and blur (StoP's defaults are on).
  assert np.ptp(p, axis=(2, 3, 4)).max() < 0.02
  assert got[0]['ctx_idx'].shape == (8, spec.num_context_tokens)
  assert got[0]['tgt_idx'].shape == (spec.num_targets, 8, spec.num_target_tokens)
  ids = np.concatenate([image_ids(b) for b in got])
  first, second = ids[:NUM_TRAIN], ids[NUM_TRAIN:]
  # 5 steps of 8 are one epoch: every image exactly once, then a fresh order.
  np.testing.assert_array_equal(np.sort(first), np.arange(NUM_TRAIN))
  np.testing.assert_array_equal(np.sort(second), np.arange(NUM_TRAIN))
  assert not np.array_equal(first, second)
  assert sources.num_train_examples(config) == NUM_TRAIN


@pytest.mark.parametrize('source', SLOW_SOURCES)
def test_file_sources_resume_exactly(files, source):
  config = file_config(files, source)
  full = batches(config, 12)
  # Step 3 starts inside a window; step 7 inside the second epoch (tfds windows are 8 records).
  for k in (3, 7):
    resumed = batches(config, 12 - k, start_step=k)
    for a, b in zip(full[k:], resumed, strict=True):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('source', SLOW_SOURCES)
def test_two_processes_read_disjoint_shards_covering_the_split(files, source):
  config = file_config(files, source)
  seen = []
  for p in (0, 1):
    # 5 steps of 4 rows: one epoch of a tfds process's 20-example shard; for the folder, the
    # rows of one epoch of the global order.
    got = batches(config, 5, process_index=p, process_count=2)
    assert all(b['image'].shape[0] == 4 and b['ctx_idx'].shape[0] == 4 for b in got)
    seen.append(np.concatenate([image_ids(b) for b in got]))
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


@pytest.mark.parametrize('source', ['folder', pytest.param('tfds', marks=pytest.mark.slow)])
def test_corrupt_images_are_skipped_and_reported(corrupt_files, source, caplog):
  config = file_config(corrupt_files, source, batch=7)
  counter = train_stream.CorruptImages(before=5)  # 5 from the sessions before a resume
  it = train_stream.create_train_iterator(config, masking.spec_from_config(config), corrupt=counter)
  with caplog.at_level(logging.WARNING):
    got = list(itertools.islice(it, 6))  # 42 rows: one epoch of 40 good + 2 corrupt files
  assert it.step == 6 and len(it.corrupt) == 2
  # What checkpoints and summary.json get: the batches before the step, earlier sessions too.
  assert counter.total(6) == 7 and counter.total(0) == 5
  names = (
    [os.path.basename(k) for k in it.corrupt]
    if source == 'folder'
    else _tfds_file_names(corrupt_files, it.corrupt)
  )
  assert sorted(names) == ['garbage.JPEG', 'truncated.JPEG']
  warned = ' '.join(r.getMessage() for r in caplog.records)
  assert all(key in warned for key in it.corrupt) and 'could not be decoded' in warned
  # Each corrupt row holds another image of its batch, not a gray fill: ids stay valid.
  ids = np.concatenate([image_ids(b) for b in got])
  assert ids.min() >= 0 and ids.max() < NUM_TRAIN and len(set(ids)) == NUM_TRAIN


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
  config = small_config()
  config.data[key] = value
  with pytest.raises(config_lib.ConfigError, match=f'config.data.{key}=.*{message}'):
    config_lib.validate(config)


def test_folder_source_needs_a_root():
  config = small_config('folder')
  with pytest.raises(config_lib.ConfigError, match='config.data.data_dir=.*root'):
    config_lib.validate(config)
