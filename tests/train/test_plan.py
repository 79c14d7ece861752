"""The run's plan: per-split data counts (plan.json, the log), and corrupt images in summary.json."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from stop_jax import config as config_lib
from stop_jax.train import loop
from stop_jax.train import plan as plan_lib


def _folder(root, num_images=14):
  """root/train/<class>/: num_images solid JPEGs in 2 classes, one corrupt JPEG, one note."""
  for i in range(num_images):
    path = os.path.join(root, 'train', f'class_{i % 2}', f'{i:02d}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(tf.io.encode_jpeg(np.full((20, 24, 3), 10 * i, np.uint8)).numpy())
  with open(os.path.join(root, 'train', 'class_0', 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff' + b'not a jpeg' * 10)
  with open(os.path.join(root, 'train', 'class_1', 'notes.txt'), 'w') as f:
    f.write('labels checked by hand')


def _config(root, steps):
  c = config_lib.base_config()
  c.model.variant, c.model.image_size, c.model.patch_size = 'tiny', 32, 4
  c.model.width, c.model.num_heads, c.model.depth = 48, 3, 1
  c.predictor.width, c.predictor.depth = 48, 1
  c.mask.min_keep = 4  # an 8x8 grid has smaller blocks than the default expects
  c.data.source, c.data.data_dir = 'folder', root
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.data.global_batch_size = 5
  c.eval.probe, c.eval.health_every_steps = False, 0
  c.total_steps, c.log_every_steps = steps, steps
  return c


def test_plan_reports_files_images_and_ignored_files_per_split(tmp_path, caplog):
  _folder(str(tmp_path))
  with caplog.at_level(logging.INFO):
    plan = plan_lib.plan_run(_config(str(tmp_path), 3))
    plan_lib.log_plan(plan)
  # The corrupt JPEG is an example until it is decoded; the note is not.
  train = {'files': 16, 'images': 15, 'ignored': 1, 'ignored_examples': ['class_1/notes.txt']}
  assert plan.num_train_examples == 15
  assert plan.to_json_dict()['data'] == {'source': 'folder', 'splits': {'train': train}}
  logged = ' '.join(r.getMessage() for r in caplog.records)
  assert 'train: 16 files, 15 images, 1 ignored (class_1/notes.txt)' in logged


@pytest.mark.slow
def test_summary_counts_the_corrupt_images_met_in_training(tmp_path):
  root, workdir = str(tmp_path / 'data'), str(tmp_path / 'run')
  _folder(root)
  # 3 steps of 5 rows: exactly one epoch of the 15 images, the corrupt one once.
  summary = loop.train_and_evaluate(_config(root, 3), workdir)
  assert summary['corrupt_images'] == 1
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['corrupt_images'] == 1
  with open(os.path.join(workdir, 'plan.json')) as f:
    assert json.load(f)['data']['splits']['train']['ignored'] == 1
