"""The offline `shapes` dataset: deterministic scenes, labels, occlusion, and every reader."""

import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.data import labelled, probe_arrays, shapes, sources, train_stream


def test_scenes_are_a_function_of_seed_split_and_index():
  a, la = shapes.example(0, 'train', 5, 32)
  b, lb = shapes.example(0, 'train', 5, 32)
  np.testing.assert_array_equal(a, b)
  assert la == lb
  assert not np.array_equal(a, shapes.example(0, 'train', 6, 32)[0])
  assert not np.array_equal(a, shapes.example(0, 'test', 5, 32)[0])  # held-out: other scenes
  assert not np.array_equal(a, shapes.example(1, 'train', 5, 32)[0])
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8


def test_train_and_held_out_splits_share_no_scene():
  def key(split, i):
    return tuple(np.round(shapes.scene(0, split, i)['depth'], 12))

  train = {key('train', i) for i in range(1000)}
  test = {key('test', i) for i in range(1000)}
  assert len(train) == len(test) == 1000  # and no scene repeats inside a split
  assert not train & test


def test_any_resolution_renders_the_same_scene():
  small = shapes.example(0, 'train', 3, 32)[0].astype(np.float32)
  large = shapes.example(0, 'train', 3, 128)[0].astype(np.float32)
  pooled = large.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
  assert np.mean(np.abs(pooled - small)) < 8.0  # out of 255: the same picture
  assert np.mean(np.abs(pooled - shapes.example(0, 'train', 4, 32)[0])) > 15.0


def _scene(**objects):
  """A hand-made scene: two objects at the same place, the background flat."""
  s = shapes.scene(0, 'train', 0)
  s.update({k: np.asarray(v) for k, v in objects.items()})
  s['texture'] = np.zeros(6)
  return s


def test_near_objects_occlude_far_ones_and_look_larger():
  # A red circle far away and a blue square near, both centred at x = 0.5.
  s = _scene(shape=[0, 1], colour=[1, 2], x=[0.5, 0.5], depth=[0.9, 0.2], size=[0.2, 0.05],
             angle=[0.0, 0.0])  # fmt: skip
  image = shapes.render(s, 64).astype(np.float32)
  # The near (blue) object is drawn last: where it is, the pixels are blue.
  cy = int(64 * (shapes._HORIZON + 0.05 + 0.8 * (0.9 - shapes._HORIZON - 0.05)))
  b = image[cy, 32]
  assert b[2] > b[0] + 50  # blue over red
  # 2 objects: count - 3 = -1; the largest-looking object is the circle. dist bins are sixths of
  # the nearest depth's distribution: depth 0.2 -> CDF 1 - mean_n 0.8^n = 0.734 -> bin 4...
  assert shapes.labels(s) == {'count': -1, 'dist': 4, 'shape': 0}
  assert shapes.nearest_depth_cdf(0.2) == pytest.approx(
    1 - np.mean([(0.8) ** n for n in range(3, 11)])
  )
  # ... which balances the classes over many scenes; counts are uniform over 3..10.
  labels = [shapes.labels(shapes.scene(0, 'train', i)) for i in range(1200)]
  for task, k in (('dist', 6), ('count', 8), ('shape', 3)):
    freq = np.bincount([y[task] for y in labels], minlength=k) / len(labels)
    assert len(freq) == k and freq.min() > 0.5 / k and freq.max() < 1.6 / k, (task, freq)


def _shapes_config(**data):
  c = config_lib.load_config_file('tiny.py')
  c.data.source = 'shapes'
  c.data.update(data)
  return c


def test_the_train_stream_reads_shapes():
  c = _shapes_config()
  assert sources.num_train_examples(c) == shapes.DEFAULT_EXAMPLES['train']
  it = train_stream.create_train_iterator(c, None)
  batch = next(iter(it))
  size = c.model.image_size
  assert batch['image'].shape == (c.data.global_batch_size, size, size, 3)
  assert np.isfinite(batch['image']).all() and batch['image'].std() > 0.1


def test_probe_and_eval_readers_give_the_rendered_scenes_and_their_labels():
  c = _shapes_config(shapes_label='dist')
  x, y = probe_arrays.load_eval_arrays(c, 'test', 12)
  expected_images, expected = shapes.batch(0, 'test', range(12), c.model.image_size, 'dist')
  np.testing.assert_array_equal(y, expected)
  assert x.shape == expected_images.shape and x.dtype == np.float32
  spec = labelled.EvalData(source='shapes', split='train', label='shapes_shape', image_size=24,
                           max_examples=10, center_crop=False)  # fmt: skip
  assert labelled.num_classes(spec) == 3 and labelled.num_examples(spec) == 10
  got = np.concatenate([b['label'][b['valid']] for b in labelled.eval_batches(spec, 8)])
  np.testing.assert_array_equal(got, shapes.batch(0, 'train', range(10), 24, 'shape')[1])
  run_spec = labelled.from_run_config(c, 'test', 5)
  assert run_spec.label == 'shapes_dist' and labelled.num_classes(run_spec) == 6


def test_shapes_labels_need_the_shapes_source():
  c = config_lib.load_config_file('eval/shapes_count.py')
  config_lib.validate(c)
  c.eval.source = 'tfds'
  with pytest.raises(config_lib.ConfigError, match='eval.label=.shapes_count. is not allowed'):
    config_lib.validate(c)
  with pytest.raises(ValueError, match='needs source=shapes'):
    labelled.EvalData(source='digits', label='shapes_dist')


def test_the_disk_cache_gives_the_rendered_bytes_and_is_reused(tmp_path, monkeypatch):
  monkeypatch.setenv(shapes.CACHE_ENV, str(tmp_path))
  monkeypatch.setattr(shapes, '_MEMO', {})
  index = shapes.CHUNK + 7  # the second chunk
  image, labels = shapes._rendered('cache-test', index, 16)
  expected, y = shapes.example(shapes.DATASET_SEED, 'cache-test', index, 16)
  np.testing.assert_array_equal(image, expected)
  assert list(labels) == [y[t] for t in shapes.TASKS]
  (chunk,) = list(tmp_path.iterdir())
  assert chunk.name.endswith(f'-16px-{shapes.CHUNK}.npz')
  # A fresh process (empty memo) reads the chunk instead of rendering.
  monkeypatch.setattr(shapes, '_MEMO', {})
  monkeypatch.setattr(shapes, 'example', lambda *a: pytest.fail('rendered again'))
  image2, labels2 = shapes._rendered('cache-test', index - 3, 16)
  expected2 = np.load(chunk)['images'][4]
  np.testing.assert_array_equal(image2, expected2)
  assert labels2.shape == (3,)
