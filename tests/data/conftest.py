"""Shared by the data tests: small configs, batch helpers and generated image files.

The file sources (image folder, tfds) run on generated images: a folder written here and the same
files as a real tfds dataset (`sources.folder_to_tfds`, TFRecord shards), made once per session.
Image i is a solid gray of level 20 + 5 i, so its id survives crops, flips, blur and grayscale.
"""

import itertools
import os
import types

import numpy as np
import pytest
import tensorflow as tf

from stop_jax import config as config_lib
from stop_jax.data import augment, masking, sources, train_stream
from tests.conftest import shared_once

MEAN = np.asarray(augment.MEAN_RGB, np.float32)
STD = np.asarray(augment.STD_RGB, np.float32)
NUM_TRAIN, NUM_VAL, NUM_CLASSES = 40, 9, 3


def small_config(source='digits', batch=16, **data):
  """A 32/4 config of `source` with pure crops (no blur or grayscale) unless `data` says more."""
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


def batches(config, n, start_step=0, **kwargs):
  """The first n batches (with masks) of create_train_iterator."""
  it = train_stream.create_train_iterator(
    config, masking.spec_from_config(config), start_step=start_step, **kwargs
  )
  return list(itertools.islice(it, n))


def pixels(images):
  return images * STD + MEAN  # Undo the normalisation: [0, 1] pixels.


def image_ids(batch):
  """Image id of every row (from its gray level) of a batch of solid images."""
  level = pixels(batch['image']).mean(axis=(1, 2, 3)) * 255
  return np.round((level - 20) / 5).astype(int)


def file_config(files, source, batch=8, **data):
  """small_config reading the generated files through `source` (folder or tfds)."""
  data = {'grayscale_prob': 0.2, 'blur_prob': 0.5, **data}  # StoP's defaults
  c = small_config(source, batch=batch, shuffle_window=8, eval_split='val', **data)
  c.data.data_dir = files.root if source == 'folder' else files.tfds_dir
  c.data.name = files.name
  config_lib.validate(c)
  return c


def write_image(path, pixels, fmt='jpeg'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  encode = tf.io.encode_jpeg if fmt == 'jpeg' else tf.io.encode_png
  with open(path, 'wb') as f:
    f.write(encode(pixels).numpy())


def _make_files(base):
  """Sizes alternate between landscape and portrait; every fifth is a PNG named .JPEG, as
  ImageNet has, to exercise the non-JPEG decoder."""
  root = os.path.join(base, 'folder')
  for split, n in (('train', NUM_TRAIN), ('val', NUM_VAL)):
    for i in range(n):
      shape = (60, 80, 3) if i % 2 else (90, 50, 3)
      fmt = 'png' if i % 5 == 4 else 'jpeg'
      path = os.path.join(root, split, f'class_{i % NUM_CLASSES}', f'img_{i:03d}.JPEG')
      write_image(path, np.full(shape, 20 + 5 * i, np.uint8), fmt)
  tfds_dir = os.path.join(base, 'tfds')
  sources.folder_to_tfds(root, tfds_dir, 'generated_images', splits=('train', 'val'), num_shards=3)


def _make_corrupt_files(base):
  """The same, plus a truncated JPEG and garbage behind a JPEG header in train, one bad in val."""
  root = os.path.join(base, 'folder')
  for split, n in (('train', NUM_TRAIN), ('val', NUM_VAL)):
    for i in range(n):
      path = os.path.join(root, split, f'class_{i % NUM_CLASSES}', f'img_{i:03d}.JPEG')
      write_image(path, np.full((40, 50, 3), 20 + 5 * i, np.uint8))
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
  data = tf.io.encode_jpeg(noise).numpy()
  with open(os.path.join(root, 'train', 'class_0', 'truncated.JPEG'), 'wb') as f:
    f.write(data[: len(data) // 3])
  with open(os.path.join(root, 'train', 'class_1', 'garbage.JPEG'), 'wb') as f:
    f.write(b'\xff\xd8\xff' + b'garbage' * 40)
  with open(os.path.join(root, 'val', 'class_2', 'not_an_image.JPEG'), 'wb') as f:
    f.write(b'not an image')
  sources.folder_to_tfds(root, os.path.join(base, 'tfds'), 'corrupt_images', ('train', 'val'), 3)


def _files(base, name):
  return types.SimpleNamespace(
    root=os.path.join(base, 'folder'), tfds_dir=os.path.join(base, 'tfds'), name=name
  )


@pytest.fixture(scope='session')
def files(tmp_path_factory):
  """NUM_TRAIN / NUM_VAL solid images in NUM_CLASSES classes, as a folder and as tfds."""
  return _files(shared_once(tmp_path_factory, 'data_files', _make_files), 'generated_images')


@pytest.fixture(scope='session')
def corrupt_files(tmp_path_factory):
  """As `files` (all 40x50 JPEGs), plus two corrupt files in train and one in val."""
  base = shared_once(tmp_path_factory, 'data_corrupt_files', _make_corrupt_files)
  return _files(base, 'corrupt_images')
