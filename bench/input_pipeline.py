r"""Benchmark of the input pipeline on ImageNet-sized JPEGs, and how it compares with the step.

Commands (from the repo root):
  python bench/input_pipeline.py                      # the whole bench
  python bench/input_pipeline.py --skip_train_step    # pipeline figures only
  python bench/input_pipeline.py --num_images=1024 --batches=40

What it does:
1. Generates `--num_images` photo-like JPEGs (smooth colour fields with texture, quality 90,
   about 100 KB each, like ImageNet's) of 500x375 (one in three 375x500) as an image folder
   root/train/<class>/*.JPEG, and the same files as a tfds dataset with
   `sources.folder_to_tfds` (4 TFRecord shards), in a temporary directory.
2. For both sources, times `create_train_iterator` at 224/16 with masks (global batch
   `--batch`) under three augmentation settings:
     rrc_flip   decode + RandomResizedCrop to 224 + flip + masks (the issue's target setting)
     stop       StoP's defaults: rrc_flip + grayscale p 0.2 + Gaussian blur p 0.5
     all        stop + colour jitter strength 1.0 with p 0.8 (I-JEPA's `color_jitter` default)
   images/s per core = images / process CPU seconds (every thread of TF and Python counted),
   which stays meaningful when other jobs share the cores; wall images/s uses every core.
3. Times the jitted train step (reusing bench/train_step.py's `build_step` / `make_batch`) for
   `configs/tiny.py` and the ViT-Ti/16 preset, and prints the ratio of the pipeline's wall
   throughput to the step's consumption, and the cores the pipeline needs to keep up.
Prints a final line `RESULT {json}`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time

# `python bench/input_pipeline.py` puts bench/ on the path, not the repo root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from stop_jax import config as config_lib  # noqa: E402
from stop_jax.data import masking, sources, train_stream  # noqa: E402

flags.DEFINE_integer('num_images', 512, 'Generated JPEGs (cycled through: epochs repeat).')
flags.DEFINE_integer('batch', 64, 'Global batch of the pipeline runs (one process).')
flags.DEFINE_integer('batches', 24, 'Timed batches per run, after the warm-up ones.')
flags.DEFINE_integer('warmup', 4, 'Untimed batches per run (pipeline start, first window).')
flags.DEFINE_integer('step_reps', 3, 'Timed train steps per model (after one untimed).')
flags.DEFINE_bool('skip_train_step', False, 'Only the pipeline figures.')
flags.DEFINE_string('workdir', '', 'Where to generate the data (default: a temporary dir).')
FLAGS = flags.FLAGS

_SETTINGS = {
  'rrc_flip': dict(color_jitter=0.0, grayscale_prob=0.0, blur_prob=0.0),
  'stop': dict(color_jitter=0.0, grayscale_prob=0.2, blur_prob=0.5),
  'all': dict(color_jitter=1.0, color_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5),
}
_CLASSES = 8
_TFDS_NAME = 'bench_photos'


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 [h, w, 3]: a smooth random colour field plus fine texture, JPEG-compressible as a photo."""
  low = rng.random((height // 25 + 2, width // 25 + 2, 3)).astype(np.float32)
  image = tf.image.resize(low[None], [height, width], method='bicubic')[0].numpy()
  image += 0.08 * rng.standard_normal((height, width, 3)).astype(np.float32)
  return np.clip(image * 255, 0, 255).astype(np.uint8)


def make_data(workdir: str, num_images: int) -> tuple[str, str, float]:
  """Writes the folder and its tfds copy; returns (folder root, tfds data_dir, mean KB/file)."""
  root, tfds_dir = os.path.join(workdir, 'folder'), os.path.join(workdir, 'tfds')
  rng = np.random.default_rng(0)
  sizes = []
  for i in range(num_images):
    cls = os.path.join(root, 'train', f'n{i % _CLASSES:08d}')
    os.makedirs(cls, exist_ok=True)
    h, w = (500, 375) if i % 3 == 0 else (375, 500)
    data = tf.io.encode_jpeg(photo_like(rng, h, w), quality=90).numpy()
    with open(os.path.join(cls, f'img_{i:05d}.JPEG'), 'wb') as f:
      f.write(data)
    sizes.append(len(data))
  sources.folder_to_tfds(root, tfds_dir, _TFDS_NAME, splits=('train',), num_shards=4)
  return root, tfds_dir, float(np.mean(sizes)) / 1024


def pipeline_config(source: str, root: str, tfds_dir: str, batch: int, **data):
  c = config_lib.base_config()
  c.model.image_size, c.model.patch_size = 224, 16
  c.data.source = source
  c.data.data_dir = root if source == 'folder' else tfds_dir
  c.data.name = _TFDS_NAME
  c.data.global_batch_size = batch
  c.data.shuffle_window = 256  # A few windows per epoch of the small generated set.
  for k, v in data.items():
    c.data[k] = v
  config_lib.validate(c)
  return c


def time_pipeline(config, batches: int, warmup: int) -> dict:
  """Wall and CPU throughput of create_train_iterator (with masks) over `batches` batches."""
  spec = masking.spec_from_config(config)
  it = train_stream.create_train_iterator(config, spec, process_index=0, process_count=1)
  for batch in itertools.islice(it, warmup):
    assert batch['image'].shape[1:] == (config.model.image_size,) * 2 + (3,)
  cpu0, wall0 = time.process_time(), time.perf_counter()
  n = sum(len(b['image']) for b in itertools.islice(it, batches))
  cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
  return {
    'images': n,
    'wall_s': wall,
    'cpu_s': cpu,
    'images_per_s': n / wall,
    'images_per_core_s': n / cpu,
    'cores_busy': cpu / wall,
  }


def time_masks(config, reps: int = 20) -> float:
  """Seconds per batch of masking.sample_masks alone (part of every pipeline figure)."""
  spec = masking.spec_from_config(config)
  t = time.perf_counter()
  for step in range(reps):
    masking.sample_masks(spec, config.seed, step, config.data.global_batch_size)
  return (time.perf_counter() - t) / reps


def time_train_step(config, reps: int) -> float:
  """Median seconds of the jitted, donated train step (bench/train_step.py's setup)."""
  import train_step as step_bench  # bench/train_step.py

  batch = step_bench.make_batch(config, config.data.global_batch_size)
  step_fn, state = step_bench.build_step(config)
  rng = jax.random.key(1)
  state, metrics = step_fn(state, batch, rng)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state, metrics = step_fn(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main(argv):
  del argv
  result = {
    'cpu_count': os.cpu_count(),
    'load_avg_1m_at_start': os.getloadavg()[0],
    'batch': FLAGS.batch,
    'image_size': 224,
  }
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='bench_input_pipeline_')
  t = time.perf_counter()
  root, tfds_dir, kb = make_data(workdir, FLAGS.num_images)
  result.update(num_images=FLAGS.num_images, mean_jpeg_kb=kb, data_gen_s=time.perf_counter() - t)
  print(f'data: {FLAGS.num_images} JPEGs of 500x375, {kb:.0f} KB mean, in {workdir}')
  print(
    f'machine: {os.cpu_count()} cores, load average (1 min) {result["load_avg_1m_at_start"]:.2f}'
  )

  pipeline = {}
  for name, data in _SETTINGS.items():
    for source in ('tfds', 'folder'):
      config = pipeline_config(source, root, tfds_dir, FLAGS.batch, **data)
      r = time_pipeline(config, FLAGS.batches, FLAGS.warmup)
      pipeline[f'{source}/{name}'] = r
      print(
        f'{source:>6} {name:<8}: {r["images_per_core_s"]:6.0f} images/s per core, '
        f'{r["images_per_s"]:6.0f} images/s wall ({r["cores_busy"]:.2f} cores busy)'
      )
  result['pipeline'] = pipeline
  mask_s = time_masks(pipeline_config('tfds', root, tfds_dir, FLAGS.batch))
  result['masks_ms_per_image'] = 1e3 * mask_s / FLAGS.batch
  print(f'masks alone (224/16): {result["masks_ms_per_image"]:.3f} ms per image')

  if not FLAGS.skip_train_step:
    import train_step as step_bench  # bench/train_step.py

    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), 'configs'))
    import tiny  # configs/tiny.py

    models = {'tiny': tiny.get_config(), 'vit_ti16': step_bench.vit_ti16_config()}
    feeds = {
      # The tiny config's own pipeline (digits); ViT-Ti/16 on the generated JPEGs, StoP's
      # default augmentation, tfds source.
      'tiny': lambda c: time_pipeline(c, FLAGS.batches, FLAGS.warmup),
      'vit_ti16': lambda c: pipeline['tfds/stop'],
    }
    result['train_step'] = {}
    for name, config in models.items():
      step_s = time_train_step(config, FLAGS.step_reps)
      step_ips = config.data.global_batch_size / step_s
      feed = feeds[name](config)
      ratio = feed['images_per_s'] / step_ips
      result['train_step'][name] = {
        'batch': config.data.global_batch_size,
        'step_s': step_s,
        'step_images_per_s': step_ips,
        'pipeline_images_per_s': feed['images_per_s'],
        'pipeline_images_per_core_s': feed['images_per_core_s'],
        'ratio_pipeline_to_step': ratio,
        'cores_to_feed_step': step_ips / feed['images_per_core_s'],
      }
      print(
        f'{name}: step {step_s:.3f} s ({step_ips:.1f} images/s); pipeline '
        f'{feed["images_per_s"]:.0f} images/s wall = {ratio:.1f}x the step; feeding the step '
        f'takes {step_ips / feed["images_per_core_s"]:.3f} cores'
      )
  print('RESULT ' + json.dumps(result, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
