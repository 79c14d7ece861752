"""The pretraining stream: this process's rows of the global batch at every step, with masks.

Every source goes through the same stages: pick the examples of a step, decode and crop them
(RandomResizedCrop), batch, augment the batch (flip, colour jitter, grayscale, Gaussian blur),
normalise with the ImageNet mean/std (`augment`), then attach the step's masks
(`masking.sample_masks`, vectorised numpy). Nothing on the hot path runs Python per image.

Step-indexed, not iterator state. The batch at global step `s` is a pure function of
(config.seed, s, process): every random draw is a stateless op keyed on the step and the row of
the global batch (`keys`), and the order of examples is computed, not accumulated.
`create_train_iterator(start_step=k)` therefore yields exactly the batches an uninterrupted run
yields from step k, with nothing to save in the checkpoint but the step, whatever the number of
prefetched batches.

- digits / synthetic / folder (random access): example `p = s * global_batch + row` of the stream
  is item `perm_e[p % N]`, `e = p // N`, with `perm_e` a permutation keyed on (seed, e): a fresh
  full shuffle every epoch, any step computed directly (resume costs nothing). A row's image does
  not depend on the number of processes; each process reads only its rows of every batch.
- tfds (sequential TFRecord shards): each process reads its own `tfds.even_splits` shard of
  `n_p` examples through the split's file instructions. An epoch of that shard is cut into windows
  of `data.shuffle_window` consecutive records (the cut points move by a random offset every
  epoch); the windows are visited in a random order and each window is permuted in memory, all
  keyed on (seed, process, epoch). Restarting at step k reads from the window that holds the
  process's example `k * B_local`, which costs one window of raw reads whatever k is. tfds
  shuffles records when it prepares a dataset, so a window is a random subset of the split.

Corrupt or undecodable images (tfds and folder) never stop a run: the row is filled with another
image of the same batch (re-augmented with the row's own flip/colour/blur), the key is logged
with a warning and kept in `TrainIterator.corrupt`; `CorruptImages` counts them per step for
the checkpoints and summary.json. Substituting rather than dropping keeps every later batch where
the step index says it is, so resume stays exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from stop_jax import config as config_lib
from stop_jax.data import augment, decode, keys, masking, shapes, sources

_WINDOWS_IN_FLIGHT = 2  # tfds windows read concurrently: the next one loads while one is used.
_TFRECORD_BUFFER = 8 << 20  # Read-ahead per shard file (large reads suit network filesystems).
_NEVER = 2**62  # Upper end of the "infinite" step and epoch ranges.


# ---------------------------------------------------------------------------------------------
# Per-example streams: (image [S, S, 3], crop draws [NUM_U], ok, key) per example. Images are
# in [0, 1] (digits, synthetic) or 0..255 (decoded files), scaled in the batch step.


def _random_access_stream(config, start_step: int, b_local: int, row0: int) -> tf.data.Dataset:
  """digits / synthetic / shapes / folder: the rows [row0, row0 + B_local) of every global batch.

  Example p = step * global_batch + row of the stream is item perm_e[p % N] with e = p // N and
  perm_e a permutation keyed on (seed, e): every epoch is a fresh shuffle, and any step can be
  computed directly.
  """
  size, global_batch = config.model.image_size, config.data.global_batch_size
  scale, ratio = tuple(config.data.crop_scale), tuple(config.data.crop_ratio)
  method, upscale = config.data.interpolation, config.data.digits_upscale
  source = config.data.source
  if source == 'digits':
    gray = tf.constant(sources.digits_splits()['train'][0])  # [N, 8, 8]
    n, src = int(gray.shape[0]), size  # Upscaled to S before cropping.
  elif source == 'folder':
    paths = sources.folder_split(config, config.data.train_split)[0]
    n, paths = len(paths), tf.constant(paths)
  elif source == 'shapes':
    n, src = sources.num_train_examples(config), size  # rendered at S, then cropped
  else:
    n, src = sources.num_train_examples(config), sources.synthetic_source_size(size)
    split_key = sources.synthetic_split_key(config.data.train_split)
  order_key = keys.make_key(keys.STREAM_ORDER, config.seed)

  def plan(step):
    # One step at once: what each row reads (vectorised, cheap).
    pos = step * global_batch + row0 + tf.range(b_local, dtype=tf.int64)  # [B_local]
    index = keys.permute(pos % n, order_key, pos // n, n)
    u = augment.crop_draws(config, step, row0, b_local)
    if source == 'folder':
      return tf.gather(paths, index), u
    windows = augment.crop_windows(u, src, src, scale, ratio)  # [B_local, 4]
    if source == 'digits':
      return sources.upscale_digits(tf.gather(gray, index), size, upscale), windows, u
    return index, windows, u

  ds = tf.data.Dataset.range(start_step, _NEVER)
  ds = ds.map(plan, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  if source == 'folder':
    ds = decode.safely_interleave(
      ds,
      lambda path, u: decode.decode_crop(tf.io.read_file(path), u, size, scale, ratio, method),
      decode.mean_image(size),
      lambda path, u: (u, path),
    )
    return ds.map(lambda image, ok, kept: (image, kept[0], ok, kept[1]))

  def example(image_source, window, u):
    if source == 'shapes':
      image_source = shapes.tf_example(config.data.train_split, image_source, size)[0]
    elif source != 'digits':
      image_source = sources.synthetic_image(split_key, image_source, size)
    # Crops of a source no larger than S are only enlarged: antialiasing would change nothing.
    return augment.crop_resize(image_source, window, size, method, antialias=False), u, True, ''

  return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_windows(n: int, window: int, key) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """One epoch of a process's shard of n records, cut into windows, in visiting order.

  key: int64 [2] keyed on (seed, process, epoch). Returns (ids, starts, ends), int64 [n_windows]
  each: window ids[i] (its place in the cut) covers records [starts[i], ends[i]) of the shard.
  The cuts sit at offset + j * window with the offset uniform in [0, window) when n > window,
  so the records that share a window change from epoch to epoch.
  """
  if n > window:
    offset = keys.uniform([], key, 0, window, tf.int64)
  else:
    offset = tf.constant(0, tf.int64)
  first = tf.where(offset > 0, offset - window, tf.constant(0, tf.int64))
  raw = tf.range(first, n, window, dtype=tf.int64)
  starts, ends = tf.maximum(raw, 0), tf.minimum(raw + window, n)
  count = tf.size(raw, out_type=tf.int64)
  ids = keys.permute(tf.range(count), key, 0, count)
  return ids, tf.gather(starts, ids), tf.gather(ends, ids)


def _tfds_records(config, files, skips, takes, start_step: int, b_local: int, process_index: int):
  """This process's shard as (record, key) in shuffled windows, from example start_step * B_local.

  files str [F], skips / takes int64 [F]: the shard's pieces of each file (`sources.tfds_shard`).
  The key is tfds's example id, `<shard file>__<record index>`. The resume position is found in
  Python from the epoch's windows, so a restart reads one window of raw records whatever the step.
  """
  n = int(takes.sum())
  window = int(min(config.data.shuffle_window, n))
  first = np.concatenate([[0], np.cumsum(takes)[:-1]]).astype(np.int64)  # shard position of files
  names = tf.constant([os.path.basename(f) for f in files])
  files_t, first_t = tf.constant(files), tf.constant(first)
  skips_t, takes_t = tf.constant(skips), tf.constant(takes)
  epoch_key = lambda e: keys.make_key(keys.STREAM_WINDOWS, config.seed, process_index, e)  # noqa: E731

  def windows_of_epoch(e):
    ids, starts, ends = _tfds_windows(n, window, epoch_key(e))
    return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(ids), e), ids, starts, ends))

  def shuffle_window(e, wid, records, file_ids, indices):
    m = tf.size(records, out_type=tf.int64)
    perm = keys.permute(tf.range(m), epoch_key(e), wid + 1, m)
    ids = tf.strings.join([tf.gather(names, file_ids), '__', tf.strings.as_string(indices)])
    return tf.gather(records, perm), tf.gather(ids, perm)

  def read_window(e, wid, start, end):
    # The pieces of each file that fall in [start, end) of the shard.
    lo, hi = tf.maximum(start, first_t), tf.minimum(end, first_t + takes_t)
    sel = tf.where(lo < hi)[:, 0]
    pieces = tf.data.Dataset.from_tensor_slices(
      (sel, tf.gather(skips_t + lo - first_t, sel), tf.gather(hi - lo, sel))
    )

    def piece(f, skip, take):
      path = tf.gather(files_t, f)
      records = tf.data.TFRecordDataset(path, buffer_size=_TFRECORD_BUFFER).skip(skip).take(take)
      where = tf.data.Dataset.range(skip, skip + take).map(lambda i: (f, i))
      return tf.data.Dataset.zip(records, where).map(lambda r, fi: (r, fi[0], fi[1]))

    # At most `window` records: exactly one element, the whole window, shuffled in memory.
    whole = pieces.flat_map(piece).batch(window)
    return whole.map(lambda r, f, i: shuffle_window(e, wid, r, f, i))

  # Where start_step falls: epoch e0, window v0 of its visiting order, record r0 in it.
  e0, q0 = divmod(start_step * b_local, n)
  _, starts, ends = (x.numpy() for x in _tfds_windows(n, window, epoch_key(e0)))
  bounds = np.concatenate([[0], np.cumsum(ends - starts)])
  v0 = int(np.searchsorted(bounds, q0, side='right') - 1)
  r0 = int(q0 - bounds[v0])

  windows = tf.data.Dataset.range(e0, _NEVER).flat_map(windows_of_epoch).skip(v0)
  records = windows.interleave(
    read_window,
    cycle_length=_WINDOWS_IN_FLIGHT,
    block_length=1,
    num_parallel_calls=_WINDOWS_IN_FLIGHT,
    deterministic=True,
  )
  return records.unbatch().skip(r0)  # Skipping inside one window: in memory, cheap.


def _tfds_stream(config, start_step, b_local, row0, process_index, process_count):
  """tfds: this process's even split, read in shuffled windows, from example start_step * B_local.

  See the module docstring and `_tfds_records`.
  """
  builder, files, skips, takes = sources.tfds_shard(config, process_index, process_count)
  size, method = config.model.image_size, config.data.interpolation
  scale, ratio = tuple(config.data.crop_scale), tuple(config.data.crop_ratio)
  records = _tfds_records(config, files, skips, takes, start_step, b_local, process_index)
  draws = tf.data.Dataset.range(start_step, _NEVER)
  draws = draws.map(lambda step: augment.crop_draws(config, step, row0, b_local)).unbatch()
  ds = tf.data.Dataset.zip(records, draws).map(lambda rk, u: (rk[0], rk[1], u))
  features = builder.info.features
  decoders = {'image': tfds.decode.SkipDecoding()}

  def decode_record(record, key, u):
    del key
    image = features.deserialize_example(record, decoders=decoders)['image']
    return decode.decode_crop(image, u, size, scale, ratio, method)

  ds = decode.safely_interleave(
    ds, decode_record, decode.mean_image(size), lambda record, key, u: (u, key)
  )
  return ds.map(lambda image, ok, kept: (image, kept[0], ok, kept[1]))


class CorruptImages:
  """Images of a run that could not be decoded (each replaced), counted over every process and
  every session of the run: `total(step)` is what the checkpoints keep and summary.json reports.

  Args:
    before: the total of the earlier sessions, up to start_step (from the checkpoint resumed).
  """

  def __init__(self, before: int = 0):
    self.before = int(before)
    self._steps: list[int] = []  # this process's corrupt images, by the step of their batch

  def add(self, step: int, count: int):
    self._steps += [step] * count

  def total(self, step: int) -> int:
    """Images replaced in the batches of steps < `step`, all processes and sessions together.

    A collective on multi-process runs (every process calls it at the same step). The stream
    runs ahead of the training loop: later batches are left out.
    """
    local = sum(s < step for s in self._steps)
    if jax.process_count() > 1:
      local = int(np.sum(multihost_utils.process_allgather(np.int64(local))))
    return self.before + local


class TrainIterator(Iterator):
  """The batches of `create_train_iterator`, one per step; see there for their contents.

  Attributes:
    step: the global step of the next batch.
    corrupt: keys (file path, or tfds's `<shard file>__<record>`) of every image that could not be
      decoded so far, once per time it was met; each was replaced and logged with a warning.
  """

  def __init__(self, ds, config, mask_spec, start_step: int, row0: int, b_local: int, counter=None):
    self._it = ds.as_numpy_iterator()
    self._counter = counter
    self._config, self._mask_spec = config, mask_spec
    self._row0, self._b_local = row0, b_local
    self.step = start_step
    self.corrupt: list[str] = []

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    images, ok, keys = next(self._it)
    if not ok.all():
      bad = [k.decode('utf-8', 'replace') for k in keys[~ok]]
      self.corrupt += bad
      if self._counter is not None:
        self._counter.add(self.step, len(bad))
      logging.warning(
        'input pipeline, step %d: skipped %d image(s) that could not be decoded (%d so far), '
        'each replaced by another image of its batch: %s',
        self.step,
        len(bad),
        len(self.corrupt),
        ', '.join(bad),
      )
    batch = {'image': images}
    if self._mask_spec is not None:
      batch.update(
        masking.sample_masks(
          self._mask_spec,
          self._config.seed,
          self.step,
          self._config.data.global_batch_size,
          start=self._row0,
          count=self._b_local,
        )
      )
    self.step += 1
    return batch


def create_train_iterator(
  config: ml_collections.ConfigDict,
  mask_spec,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  corrupt: CorruptImages | None = None,
) -> TrainIterator:
  """This process's share of the global batch at steps start_step, start_step + 1, ...

  Each item: {'image': float32 [B_local, S, S, 3] (normalised), plus the arrays of
  masking.sample_masks for rows [process_index * B_local, (process_index + 1) * B_local) of the
  global batch}, B_local = global_batch_size / process_count. mask_spec=None yields images only
  (data benchmarks). The dataset is opened here, so an unprepared, empty or missing dataset
  fails now (DatasetNotReadyError), not at the first step. Starting at step k yields the same
  batches as an uninterrupted run from step k, at a cost independent of k. `corrupt`, if
  given, counts the images that could not be decoded.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = config.data.global_batch_size
  if global_batch % process_count:
    raise ValueError(
      f'config.data.global_batch_size={global_batch} is not divisible by the process count '
      f'({process_count}).'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  if start_step < 0:
    raise ValueError(f'start_step={start_step}: expected >= 0.')
  b_local = global_batch // process_count
  row0 = process_index * b_local
  source = config.data.source
  if source not in config_lib.DATA_SOURCES:
    raise ValueError(f'config.data.source={source!r}: expected one of {config_lib.DATA_SOURCES}.')
  if config.data.interpolation not in ('bilinear', 'bicubic'):
    raise ValueError(
      f'config.data.interpolation={config.data.interpolation!r}: expected bilinear or bicubic.'
    )
  if source == 'tfds':
    ds = _tfds_stream(config, start_step, b_local, row0, process_index, process_count)
  else:
    ds = _random_access_stream(config, start_step, b_local, row0)
  ds = ds.batch(b_local, drop_remainder=True)

  # Decoded sources hand over 0..255 pixels; digits / synthetic are already in [0, 1].
  pixel_scale = 1.0 / 255.0 if source in ('tfds', 'folder') else 1.0
  augment_batch = augment.compiled_augment(config.data, pixel_scale)

  def finish(batch, step):
    images, u, ok, example_keys = batch
    colour = augment.colour_draws(config, step, row0, b_local)
    return augment_batch(images, u, colour, ok), ok, example_keys

  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(start_step, _NEVER))
  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.with_options(keys.deterministic_options()).prefetch(tf.data.AUTOTUNE)
  return TrainIterator(ds, config, mask_spec, start_step, row0, b_local, corrupt)
