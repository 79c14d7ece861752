"""Training and probing data: digits (bundled), tfds, or synthetic images.

The training stream is deterministic: the batch at global step `s` is a pure function of
(config.seed, s, process). All randomness comes from stateless TF ops keyed on the global position
`s * global_batch + row` of an example, so a run restarted at step k sees exactly the batches of
an uninterrupted run (for digits / synthetic, a row's image does not even depend on the number of
processes sharing the batch).

- digits / synthetic live in memory (or are generated on the fly): example `p` of the stream is
  item `index_shuffle(p % N, key(seed, p // N))` (a fresh permutation per epoch), so starting at
  any step costs nothing.
- tfds reads files in a seeded order and resumes by skipping `start_step` batches of raw records
  (before decoding). That is exact but linear in the step; a later issue makes it cheaper.

Augmentation is the StoP/I-JEPA recipe: RandomResizedCrop (torchvision semantics) and an optional
horizontal flip; pixels are then normalised with the ImageNet mean/std.
"""

from __future__ import annotations

import functools
import math
import textwrap
import zlib
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from stop_jax import config_base, masking

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)

SYNTHETIC_NUM_EXAMPLES = 1_281_167  # ImageNet-1k train, so schedules look like the real thing.
SYNTHETIC_NUM_CLASSES = 1000
EVAL_RESIZE_RATIO = 256 / 224  # Resize the shorter side to image_size * 256/224, then crop.
_RRC_ATTEMPTS = 10  # As torchvision: fall back to a center crop after this many misses.

# Independent random streams (first word of every stateless key).
_STREAM_ORDER, _STREAM_AUGMENT, _STREAM_SYNTH_PIXELS, _STREAM_SYNTH_LABELS = 1, 2, 3, 4


class DatasetNotReadyError(RuntimeError):
  """The tfds dataset is not prepared (or unknown); the message says how to prepare it."""


def _hide_gpus_from_tf():
  # TF would otherwise reserve GPU memory that JAX needs; the pipeline only runs on CPU.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    pass  # TF devices already initialised: nothing we can change any more.


_hide_gpus_from_tf()


def _key(*words) -> tf.Tensor:
  """A stateless seed [2] int64 folding in every word (ints or int64 scalar tensors)."""
  key = tf.constant([0, 0], tf.int64)
  for w in words:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(w, tf.int64), alg='philox')
  return key


def _uniform(shape, key, lo=0.0, hi=1.0, dtype=tf.float32):
  return tf.random.stateless_uniform(shape, key, minval=lo, maxval=hi, dtype=dtype, alg='philox')


# ---------------------------------------------------------------------------------------------
# Augmentation.

# Columns of an example's uniform draws: the crop attempts' scales and log-ratios, the crop
# offsets, the flip.
_U_SCALE = slice(0, _RRC_ATTEMPTS)
_U_RATIO = slice(_RRC_ATTEMPTS, 2 * _RRC_ATTEMPTS)
_U_Y, _U_X, _U_FLIP = 2 * _RRC_ATTEMPTS, 2 * _RRC_ATTEMPTS + 1, 2 * _RRC_ATTEMPTS + 2
_NUM_U = 2 * _RRC_ATTEMPTS + 3


def _step_draws(config, step, row0: int, b_local: int) -> tf.Tensor:
  """Uniforms float32 [B_local, NUM_U] for this process's rows of the batch at `step`.

  They are rows of one [global_batch, NUM_U] draw keyed on (seed, step): a row gets the same
  augmentation whatever the number of processes.
  """
  key = _key(_STREAM_AUGMENT, config.seed, step)
  return _uniform([config.data.global_batch_size, _NUM_U], key)[row0 : row0 + b_local]


def _crop_windows(u, height, width, scale, ratio) -> tf.Tensor:
  """torchvision RandomResizedCrop.get_params with all its attempts at once, batched.

  u: float [..., NUM_U]; height, width: int [...] (or scalars). Returns int32 [..., 4] with
  (y, x, h, w) of each crop. The first attempt that fits wins; if none of the 10 fits, the
  center crop of the whole image clamped to the ratio range, as torchvision.
  """
  ones = tf.ones_like(u[..., 0])
  h_in = tf.cast(height, tf.float32) * ones  # [...]
  w_in = tf.cast(width, tf.float32) * ones
  area = (h_in * w_in)[..., None] * (scale[0] + (scale[1] - scale[0]) * u[..., _U_SCALE])
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(lo + (hi - lo) * u[..., _U_RATIO])  # Log-uniform, as torchvision.
  # tf.round rounds half to even, like Python's round() in torchvision.
  cand_w = tf.round(tf.sqrt(area * aspect))  # [..., attempts]
  cand_h = tf.round(tf.sqrt(area / aspect))
  ok = (cand_w > 0) & (cand_w <= w_in[..., None]) & (cand_h > 0) & (cand_h <= h_in[..., None])
  n = _RRC_ATTEMPTS
  first = tf.reduce_min(tf.where(ok, tf.range(n), n), axis=-1)  # argmax leaves ties unspecified
  chosen = tf.one_hot(first, n, on_value=True, off_value=False)  # all False when none fits
  found = first < n
  in_ratio = w_in / h_in
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h_in * ratio[1]), w_in)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w_in / ratio[0]), h_in)
  h = tf.where(found, tf.reduce_sum(tf.where(chosen, cand_h, 0.0), axis=-1), fb_h)
  w = tf.where(found, tf.reduce_sum(tf.where(chosen, cand_w, 0.0), axis=-1), fb_w)
  # Uniform integer offsets in [0, room], i.e. torch.randint(0, room + 1).
  room_h, room_w = h_in - h, w_in - w
  y = tf.where(found, tf.minimum(tf.floor(u[..., _U_Y] * (room_h + 1)), room_h), room_h // 2)
  x = tf.where(found, tf.minimum(tf.floor(u[..., _U_X] * (room_w + 1)), room_w), room_w // 2)
  return tf.cast(tf.stack([y, x, h, w], axis=-1), tf.int32)


def _resize(image, size: int, antialias: bool) -> tf.Tensor:
  """float [h, w, 3] in [0, 1] -> [size, size, 3], bicubic; clipped since bicubic overshoots."""
  image = tf.image.resize(image, [size, size], method='bicubic', antialias=antialias)
  return tf.clip_by_value(image, 0.0, 1.0)


def _crop_resize(image, window, size: int, antialias: bool) -> tf.Tensor:
  """The crop (y, x, h, w) of image [H, W, 3] resized to [size, size, 3]."""
  y, x, h, w = tf.unstack(window)
  return _resize(image[y : y + h, x : x + w, :], size, antialias)


def _normalise(images) -> tf.Tensor:
  return (images - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


def _flip_and_normalise(images, u, flip: bool) -> tf.Tensor:
  """images: float [B, S, S, 3] in [0, 1]; u: [B, NUM_U]. Mirrors rows with u_flip < 0.5."""
  if flip:
    mirror = u[:, _U_FLIP] < 0.5
    images = tf.where(mirror[:, None, None, None], tf.reverse(images, axis=[2]), images)
  return _normalise(images)


def _crop_args(config):
  return tuple(config.data.crop_scale), tuple(config.data.crop_ratio)


def _to_rgb_float(image) -> tf.Tensor:
  """uint8 [h, w, 1 or 3] -> float32 [h, w, 3] in [0, 1]."""
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return tf.cast(image, tf.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Sources.


@functools.cache
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """sklearn digits, split once with a fixed seed: {'train': 1437, 'test': 360} (images [N, 8, 8])."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)  # Values 0..16 -> [0, 1].
  labels = digits.target.astype(np.int32)
  # Fixed random_state: the held-out split must not move with config.seed.
  x_tr, x_te, y_tr, y_te = train_test_split(
    images, labels, test_size=0.2, random_state=0, stratify=labels
  )
  return {'train': (x_tr, y_tr), 'test': (x_te, y_te)}


def _upscale_digits(gray, config) -> tf.Tensor:
  """float [..., 8, 8] in [0, 1] -> [..., S, S, 3], upscaled with config.data.digits_upscale."""
  method = config.data.digits_upscale
  if method not in ('bilinear', 'bicubic'):
    raise ValueError(f'config.data.digits_upscale={method!r}: expected bilinear or bicubic.')
  size = config.model.image_size
  image = tf.image.resize(gray[..., None], [size, size], method=method)
  return tf.image.grayscale_to_rgb(tf.clip_by_value(image, 0.0, 1.0))


def _synthetic_split_key(split: str) -> int:
  return zlib.crc32(split.encode())  # Stable across runs, unlike hash().


def _synthetic_source_size(size: int) -> int:
  return max(8, size // 4)  # Low-resolution noise: cheap to draw, smooth once enlarged.


def _synthetic_image(split_key, index, size: int) -> tf.Tensor:
  """Noise [s, s, 3] in [0, 1], s = _synthetic_source_size(size); fixed per (split, index)."""
  src = _synthetic_source_size(size)
  return _uniform([src, src, 3], _key(_STREAM_SYNTH_PIXELS, split_key, index))


def _synthetic_label(split_key, index) -> tf.Tensor:
  key = _key(_STREAM_SYNTH_LABELS, split_key, index)
  return _uniform([], key, 0, SYNTHETIC_NUM_CLASSES, tf.int32)


def _tfds_builder(config):
  data_dir = config.data.data_dir or None
  try:
    return tfds.builder(config.data.name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise DatasetNotReadyError(
      f'config.data.name={config.data.name!r} is not a known tfds dataset.'
    ) from e


def _not_ready_message(config, builder) -> str:
  name, data_dir = config.data.name, config.data.data_dir
  where = data_dir or f'{getattr(builder, "data_dir_root", "")} (the tfds default)'
  msg = (
    f'tfds dataset {name!r} is not prepared in {where}. Prepare it once with:\n'
    f'  tfds build {name} --data_dir={data_dir or "<dir>"}'
  )
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if manual:
    msg += (
      ' --manual_dir=<manual dir>\nThis dataset cannot be downloaded by tfds; put its files in '
      f'<manual dir> first:\n{textwrap.indent(textwrap.dedent(manual).strip(), "  ")}'
    )
  if not data_dir:
    msg += '\nand set config.data.data_dir=<dir>.'
  return msg


def _tfds_dataset(config, builder, split, **kwargs) -> tf.data.Dataset:
  """builder.as_dataset, turning a missing preparation into one clear start-up error."""
  try:
    return builder.as_dataset(split=split, **kwargs)
  except (AssertionError, ValueError, KeyError, FileNotFoundError, tf.errors.NotFoundError) as e:
    # tfds's own first line says which of (unprepared, bad split, ...) it was.
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DatasetNotReadyError(f'{_not_ready_message(config, builder)}\n(tfds: {cause})') from e


def num_train_examples(config: ml_collections.ConfigDict) -> int:
  """Examples per epoch: config.data.num_train_examples if > 0, else the source's size."""
  if config.data.num_train_examples > 0:
    return int(config.data.num_train_examples)
  source = config.data.source
  if source == 'digits':
    return len(_digits_splits()['train'][1])
  if source == 'synthetic':
    return SYNTHETIC_NUM_EXAMPLES
  builder = _tfds_builder(config)
  try:
    return int(builder.info.splits[config.data.train_split].num_examples)
  except KeyError as e:
    raise DatasetNotReadyError(_not_ready_message(config, builder)) from e


# ---------------------------------------------------------------------------------------------
# Training stream.


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel map/interleave must keep their order for resume.
  return options


def _in_memory_stream(config, start_step: int, b_local: int, row0: int) -> tf.data.Dataset:
  """digits / synthetic: (image [S, S, 3] in [0, 1], draws [NUM_U]) per example.

  Example p = step * global_batch + row of the stream is item perm_e[p % N] with e = p // N and
  perm_e a permutation keyed on (seed, e): every epoch is a fresh shuffle, and any step can be
  computed directly.
  """
  size, global_batch = config.model.image_size, config.data.global_batch_size
  scale, ratio = _crop_args(config)
  digits = config.data.source == 'digits'
  if digits:
    gray = tf.constant(_digits_splits()['train'][0])  # [N, 8, 8]
    n, src = int(gray.shape[0]), size  # Upscaled to S before cropping.
  else:
    n, src = num_train_examples(config), _synthetic_source_size(size)
    split_key = _synthetic_split_key(config.data.train_split)
  order_key = _key(_STREAM_ORDER, config.seed)

  def plan(step):
    # One step at once: what each row reads and where it is cropped (vectorised, cheap).
    pos = step * global_batch + row0 + tf.range(b_local, dtype=tf.int64)  # [B_local]
    epoch = pos // n
    # The raw op, since tf.random.experimental.index_shuffle mis-pads batched [n, 2] seeds
    # (TF 2.21); a 3-word seed per row: (order key, epoch).
    words = [tf.fill(tf.shape(epoch), order_key[0]), tf.fill(tf.shape(epoch), order_key[1])]
    index = tf.raw_ops.RandomIndexShuffle(
      index=pos % n,
      seed=tf.stack([*words, epoch], axis=-1),
      max_index=tf.fill(tf.shape(pos), tf.constant(n - 1, tf.int64)),
      rounds=4,
    )
    u = _step_draws(config, step, row0, b_local)
    windows = _crop_windows(u, src, src, scale, ratio)  # [B_local, 4]
    source = _upscale_digits(tf.gather(gray, index), config) if digits else index
    return source, windows, u

  def example(source, window, u):
    image = source if digits else _synthetic_image(split_key, source, size)
    # Crops of a source no larger than S are only enlarged: antialiasing would change nothing.
    return _crop_resize(image, window, size, antialias=False), u

  ds = tf.data.Dataset.range(start_step, 2**62)
  ds = ds.map(plan, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_stream(config, start_step, b_local, row0, process_index, process_count):
  """tfds: (image [S, S, 3] in [0, 1], draws [NUM_U]) per example.

  Files and examples come in a seeded order, repeated; resuming skips start_step batches of
  raw records before any decoding (exact, but linear in the step: a later issue makes it cheaper).
  """
  builder = _tfds_builder(config)
  seed, size = config.seed, config.model.image_size
  scale, ratio = _crop_args(config)
  feature = builder.info.features['image']
  is_jpeg = getattr(feature, 'encoding_format', None) == 'jpeg'
  # JPEGs are decoded only inside the crop window, which saves most of the decoding.
  decoders = {'image': tfds.decode.SkipDecoding()} if is_jpeg else None
  split = tfds.even_splits(config.data.train_split, n=process_count)[process_index]
  order_seed = seed + 7919 * process_index  # Processes read disjoint shards in their own orders.
  read_config = tfds.ReadConfig(options=_options(), shuffle_seed=order_seed, try_autocache=False)
  ds = _tfds_dataset(
    config, builder, split, shuffle_files=True, decoders=decoders, read_config=read_config
  )
  ds = ds.map(lambda ex: ex['image']).repeat()
  if config.data.shuffle_buffer > 1:
    ds = ds.shuffle(config.data.shuffle_buffer, seed=order_seed)
  ds = ds.skip(start_step * b_local)
  draws = tf.data.Dataset.range(start_step, 2**62)
  draws = draws.map(lambda step: _step_draws(config, step, row0, b_local)).unbatch()

  def example(image, u):
    if is_jpeg:
      shape = tf.image.extract_jpeg_shape(image)
      window = _crop_windows(u, shape[0], shape[1], scale, ratio)
      crop = tf.image.decode_and_crop_jpeg(image, window, channels=3)
      return _resize(_to_rgb_float(crop), size, antialias=True), u
    image = _to_rgb_float(image)
    shape = tf.shape(image)
    window = _crop_windows(u, shape[0], shape[1], scale, ratio)
    return _crop_resize(image, window, size, antialias=True), u

  return tf.data.Dataset.zip(ds, draws).map(example, num_parallel_calls=tf.data.AUTOTUNE)


def create_train_iterator(
  config: ml_collections.ConfigDict,
  mask_spec,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of the global batch at steps start_step, start_step + 1, ...

  Each item: {'image': float32 [B_local, S, S, 3] (normalised), plus the arrays of
  masking.sample_masks for rows [process_index * B_local, (process_index + 1) * B_local) of the
  global batch}. mask_spec=None yields images only (data benchmarks). The dataset is opened here,
  so an unprepared tfds dataset fails now (DatasetNotReadyError), not at the first step.
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
  b_local = global_batch // process_count
  row0 = process_index * b_local
  source = config.data.source
  if source not in config_base.DATA_SOURCES:
    raise ValueError(f'config.data.source={source!r}: expected one of {config_base.DATA_SOURCES}.')
  if source == 'tfds':
    ds = _tfds_stream(config, start_step, b_local, row0, process_index, process_count)
  else:
    ds = _in_memory_stream(config, start_step, b_local, row0)
  ds = ds.batch(b_local, drop_remainder=True)
  ds = ds.map(lambda images, u: _flip_and_normalise(images, u, config.data.flip))
  ds = ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)
  return _attach_masks(ds, config, mask_spec, start_step, row0, b_local)


def _attach_masks(ds, config, mask_spec, start_step, row0, b_local):
  step = start_step
  for images in ds.as_numpy_iterator():
    batch = {'image': images}
    if mask_spec is not None:
      batch.update(
        masking.sample_masks(
          mask_spec, config.seed, step, config.data.global_batch_size, start=row0, count=b_local
        )
      )
    yield batch
    step += 1


# ---------------------------------------------------------------------------------------------
# Probe data.


def _center_resize(image, size: int) -> tf.Tensor:
  """Shorter side to round(size * 256/224), then the central [size, size] crop."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = round(size * EVAL_RESIZE_RATIO) / tf.reduce_min(shape)
  new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, new_hw, method='bicubic', antialias=True)
  y, x = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  return tf.clip_by_value(image[y : y + size, x : x + size, :], 0.0, 1.0)


def load_eval_arrays(
  config: ml_collections.ConfigDict, split: str, max_examples: int
) -> tuple[np.ndarray, np.ndarray]:
  """Un-augmented probe data: float32 images [N, S, S, 3] (normalised) and int32 labels [N].

  digits: split 'train' or 'test' (the fixed held-out split). tfds: 'train' / 'test' mean
  config.data.train_split / eval_split, other names are tfds splits; every process reads the same
  first max_examples examples (max_examples < 0: all). synthetic: noise with random labels.
  """
  limit = None if max_examples < 0 else int(max_examples)
  size = config.model.image_size
  source = config.data.source
  if source == 'digits':
    splits = _digits_splits()
    if split not in splits:
      raise ValueError(f'digits has splits {sorted(splits)}, not {split!r}.')
    gray, labels = (a[:limit] for a in splits[split])
    images = _normalise(_upscale_digits(tf.constant(gray), config)).numpy()
    return images.astype(np.float32), labels.astype(np.int32)
  if source == 'synthetic':
    n = SYNTHETIC_NUM_EXAMPLES if limit is None else limit
    key = _synthetic_split_key(split)
    ds = tf.data.Dataset.range(n).map(
      lambda i: (
        _normalise(_resize(_synthetic_image(key, i, size), size, antialias=False)),
        _synthetic_label(key, i),
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  else:
    # The trainer asks for 'train' / 'test'; those mean the configured tfds splits.
    split = {'train': config.data.train_split, 'test': config.data.eval_split}.get(split, split)
    builder = _tfds_builder(config)
    read_config = tfds.ReadConfig(options=_options(), try_autocache=False)
    ds = _tfds_dataset(config, builder, split, shuffle_files=False, read_config=read_config)
    if limit is not None:
      ds = ds.take(limit)
    ds = ds.map(
      lambda ex: (_normalise(_center_resize(_to_rgb_float(ex['image']), size)), ex['label']),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  images, labels = [], []
  for x, y in ds.with_options(_options()).batch(256).prefetch(2).as_numpy_iterator():
    images.append(x)
    labels.append(y)
  if not images:
    return np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int32)
  return np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.int32)
