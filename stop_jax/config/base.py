"""The one place where every config key is declared, documented and checked.

Config files in `configs/` start from `base_config()` and change values; they never add keys
(the config is locked, so a typo such as `--config.stop.sgima=0.1` fails at once). `validate`
turns every value a user can set into an early, named error before anything is compiled.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib

import ml_collections
from absl import logging

# The official ViT table (I-JEPA `vision_transformer.py`): width, depth, heads, mlp ratio.
VIT_VARIANTS = {
  'tiny': (192, 12, 3, 4.0),
  'small': (384, 12, 6, 4.0),
  'base': (768, 12, 12, 4.0),
  'large': (1024, 24, 16, 4.0),
  'huge': (1280, 32, 16, 4.0),
  'giant': (1408, 40, 16, 48 / 11),
}

STOP_MODES = ('masked', 'off', 'context', 'both', 'fixed_cov', 'untied')
MASK_MODES = ('official', 'corrected')
DATA_SOURCES = ('digits', 'tfds', 'synthetic', 'folder')
INTERPOLATIONS = ('bilinear', 'bicubic')


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default (the ViT-B/16 StoP recipe of paper Table 10)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'base'  # One of VIT_VARIANTS.
  # Overrides of the variant's shape (-1 = take it from the variant), for small custom models.
  c.model.width = -1
  c.model.depth = -1
  c.model.num_heads = -1
  c.model.mlp_ratio = -1.0
  c.model.patch_size = 16
  c.model.image_size = 224
  c.model.dtype = 'float32'  # Compute dtype: float32 | bfloat16 (params stay float32).
  c.model.gelu = 'exact'  # exact (official, erf) | tanh (faster on some backends).
  # Activation rematerialisation: none | block (recompute each block in the backward pass) |
  # dots (keep the Dense outputs, recompute attention and elementwise ops).
  c.model.remat = 'none'
  # Storage dtype of the EMA target encoder: float32 | bfloat16 (halves its memory; the EMA is
  # computed in float32 and stochastically rounded, so updates far below bf16's resolution still
  # move the target on average).
  c.model.target_dtype = 'float32'
  c.model.scan_blocks = True  # nn.scan over blocks: compile time flat in depth.
  # Attention kernel: auto (cuDNN flash attention on GPUs in bf16, else einsum) | einsum (ours,
  # float32 logits; fastest on XLA:CPU) | xla (jax.nn.dot_product_attention) | cudnn.
  c.model.attention = 'auto'

  c.predictor = ml_collections.ConfigDict()
  c.predictor.width = 384
  c.predictor.depth = 6
  c.predictor.num_heads = -1  # -1 = the encoder's head count (official).
  c.predictor.pos_embed = 'sincos'  # sincos (official) | learned (paper ablation).

  # StoP: where the noise goes and how big it is. sigma is a standard deviation, as in the
  # official code (the paper writes N(0, sigma I)).
  c.stop = ml_collections.ConfigDict()
  c.stop.mode = 'masked'  # One of STOP_MODES; 'off' is the I-JEPA baseline.
  c.stop.sigma = 0.25
  c.stop.reg = 'none'  # none | l1 | l2: penalty on A (paper ablation, with mode='off').
  c.stop.reg_weight = 0.0

  c.mask = ml_collections.ConfigDict()
  c.mask.mode = 'corrected'  # official (bit-faithful quirks) | corrected. See masking.py.
  c.mask.num_targets = 4
  c.mask.target_scale = (0.15, 0.2)
  c.mask.target_aspect = (0.75, 1.5)
  c.mask.context_scale = (0.85, 1.0)
  c.mask.min_keep = 10
  # Fixed token counts per image (static shapes); -1 = the official sampler's average at this
  # grid (what the official code keeps after truncating to the batch minimum at 64 per device).
  c.mask.num_context_tokens = -1
  c.mask.num_target_tokens = -1

  c.loss = ml_collections.ConfigDict()
  c.loss.type = 'smooth_l1'  # smooth_l1 (official, beta 1) | l2.
  c.loss.num_target_layers = 1  # Targets = mean of the last K blocks' layer-normed outputs.

  c.optim = ml_collections.ConfigDict()
  c.optim.epochs = 600
  c.optim.warmup_epochs = 15.0
  c.optim.ipe_scale = 1.0  # Schedule horizon T = ipe_scale * epochs * steps_per_epoch.
  c.optim.start_lr = 2e-4
  c.optim.lr = 8e-4
  c.optim.final_lr = 1e-6
  c.optim.constant_lr_after_epoch = -1.0  # StoP ViT-H: 250 (LR held constant afterwards).
  c.optim.weight_decay = 0.04
  c.optim.final_weight_decay = 0.4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 0.0  # 0 = no clipping (official).
  c.optim.ema_start = 0.996
  c.optim.ema_end = 1.0

  c.data = ml_collections.ConfigDict()
  # One of DATA_SOURCES: tfds | folder (data_dir/<split>/<class>/*.JPEG, the official layout;
  # classes sorted -> labels) | digits (sklearn, offline) | synthetic (noise, for benchmarks).
  c.data.source = 'tfds'
  c.data.name = 'imagenet2012'  # tfds name (source=tfds).
  c.data.train_split = 'train'  # tfds split, or the folder's split directory ('train').
  c.data.eval_split = 'validation'  # Probe test split (folder: usually 'val').
  c.data.data_dir = ''  # tfds data_dir ('' = the tfds default), or the folder root.
  c.data.global_batch_size = 2048
  # Examples per epoch; -1 = read from the dataset's metadata. Sets steps_per_epoch.
  c.data.num_train_examples = -1
  # Augmentation, defaults = StoP's official runs (torchvision semantics, in this order):
  # RandomResizedCrop(scale, ratio) -> flip -> colour jitter -> grayscale -> blur -> normalise.
  c.data.crop_scale = (0.3, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.interpolation = 'bilinear'  # RandomResizedCrop resize: bilinear (torchvision) | bicubic.
  c.data.flip = True  # Horizontal flip with probability 1/2 (I-JEPA's own configs: off).
  # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with strength s, applied with color_jitter_prob; 0 = off
  # (StoP and I-JEPA: color_jitter_strength 0).
  c.data.color_jitter = 0.0
  c.data.color_jitter_prob = 0.8
  c.data.grayscale_prob = 0.2  # RandomGrayscale (StoP: on, 0.2; 0 = off).
  c.data.blur_prob = 0.5  # Gaussian blur (StoP: on, 0.5; 0 = off) ...
  c.data.blur_sigma = (0.1, 2.0)  # ... with a standard deviation uniform in this range (pixels).
  # tfds: each epoch reads a process's shard in windows of this many consecutive records, in a
  # random order, each shuffled in memory (about 2-3 windows of encoded images are in RAM).
  c.data.shuffle_window = 10_000
  c.data.digits_upscale = 'bilinear'  # digits: how 8x8 digits are resized to image_size.

  c.eval = ml_collections.ConfigDict()
  c.eval.probe = True  # Linear probe of the target encoder at the end of training.
  c.eval.probe_random_init = True  # Also probe a randomly initialised encoder (reference).
  c.eval.probe_l2 = (1e-4, 1e-3, 1e-2, 1e-1)  # Swept on a held-out part of the train split.
  c.eval.probe_max_examples = 50_000
  # k-NN sanity metric during pretraining (stop_jax/eval/knn.py: knn_eval) on the run's own data
  # (config.data splits, un-augmented), avg-pooled last layer. 0 = off.
  c.eval.knn_every_steps = 0
  c.eval.knn_max_examples = 10_000  # Per split; -1 = all.
  c.eval.knn_k = 20  # Neighbours (DINO protocol: 20).
  c.eval.knn_temperature = 0.07  # Vote weight exp(cos_sim / T) (DINO protocol: 0.07).
  # `python -m stop_jax.evaluate --config=configs/eval/X.py --workdir=W`: the keys below (model
  # keys come from the run's config.json). Results go to W/eval/<name>.json.
  c.eval.name = ''  # '' = '<protocol>_<dataset>'.
  # logreg: StoP's IN-1k 1% probe, L2 logistic regression (L-BFGS) on standardised features,
  #   l2 swept over probe_l2 on a held-out 20% of the train split (one value: no sweep).
  # linear: full linear probe (VISSL): a linear head trained with SGD/LARS on augmented images.
  # knn: weighted k-NN on cosine similarity (knn_k, knn_temperature).
  c.eval.protocol = 'logreg'
  # Features of the frozen target encoder: 'last' = avg-pooled last layer (after the final norm),
  # 'last4' = concat of the avg-pooled last 4 blocks, each after the final norm. Both are reported.
  c.eval.feature_types = ('last', 'last4')
  c.eval.source = 'tfds'  # tfds | folder (data_dir/<split>/<class>/*.jpg) | digits | synthetic.
  c.eval.dataset = 'imagenet2012'  # tfds name (source=tfds); also names the result file.
  c.eval.data_dir = ''  # tfds data_dir ('' = the tfds default), or the root for source=folder.
  c.eval.train_split = 'train'
  c.eval.test_split = 'validation'
  c.eval.label = 'label'  # label | clevr_count | clevr_distance (the VTAB task definitions).
  c.eval.max_train_examples = -1  # First N of each split (-1 = all): quick runs.
  c.eval.max_test_examples = -1
  c.eval.image_size = -1  # Eval resolution; -1 = the run's model.image_size.
  c.eval.resize_ratio = 256 / 224  # Test images: shorter side to image_size * this, center crop.
  # False: test images are resized whole to image_size x image_size instead (VTAB; CLEVR labels
  # depend on every object, which a center crop of a 3:2 scene can cut off).
  c.eval.center_crop = True
  c.eval.batch_size = 256  # Global batch of feature extraction (rounded up to the devices).
  c.eval.cache_features = True  # Reuse features in W/eval/cache (logreg, knn).
  # protocol=linear: one BatchNorm-free linear head per (feature type, lr), all trained on the
  # same frozen forward pass. LR = lr * linear_batch_size / 256, cosine to 0.
  c.eval.linear_optimizer = 'sgd'  # sgd (with momentum) | lars.
  c.eval.linear_lrs = (0.01,)
  c.eval.linear_momentum = 0.9
  c.eval.linear_weight_decay = 0.0  # On the head's kernel only.
  c.eval.linear_epochs = 100
  c.eval.linear_warmup_epochs = 0.0
  c.eval.linear_batch_size = 256
  c.eval.linear_crop_scale = (0.08, 1.0)  # RandomResizedCrop area range for training images.
  c.eval.linear_flip = True  # Random horizontal flip for training images.
  # Features enter the heads standardised with the mean/std of this many un-augmented train
  # images: a fixed affine map (so the heads stay linear, no BatchNorm) that makes plain SGD
  # converge on features with a large common component. 0 = raw features.
  c.eval.linear_standardize_examples = 10_000
  c.eval.log_every_steps = 100  # protocol=linear: training-loss log interval.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000  # 0 = only at the end.
  c.checkpoint.every_minutes = 30.0  # Also save when this long has passed (0 = off).
  c.checkpoint.keep = 3  # The latest k checkpoints ...
  c.checkpoint.keep_every = 0  # ... plus every step that is a multiple of this, forever (0 = off).
  # Resuming in a workdir whose config.json differs (beyond run-control keys such as total_steps,
  # logging, checkpointing, eval, mesh and data_dir) is refused unless this is True.
  c.checkpoint.allow_config_change = False

  # Non-finite loss or gradients: 'stop' (name the step and the last good checkpoint) or 'skip'
  # (drop that update, count it, stop after max_consecutive_skips in a row). Either way the
  # bad update never reaches the params.
  c.on_nonfinite = 'stop'
  c.max_consecutive_skips = 10

  # Matmul library of XLA:CPU for the train step: onednn (measured the fastest on the ViT-Ti/16
  # reference step, now level with eigen within ~1%; bench/README.md) | eigen | ynnpack (XLA's
  # own default). Ignored on GPU / TPU. All float32; the sums differ only in rounding order.
  c.xla_cpu_matmul = 'onednn'

  c.log_every_steps = 50
  c.total_steps = -1  # -1 = epochs * steps_per_epoch; set to stop early (schedules unchanged).
  # Device mesh (data, fsdp, tensor); one axis may be -1 = the devices left over. The batch is
  # split over data x fsdp; params / optimiser state / EMA target over fsdp (their 'embed' dim);
  # heads and MLP units over tensor. See stop_jax/runtime/sharding.py.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Freezes the set of keys: assigning a key that base_config() did not declare raises."""
  config.lock()
  return config


def from_dict(values: dict, strict: bool = True) -> ml_collections.ConfigDict:
  """A locked config: `base_config()` updated with saved values (e.g. a run's config.json).

  JSON has no tuples, so a list becomes a tuple where the base value is one. A key that
  base_config() does not declare is a ConfigError when strict, else skipped with a warning (a
  run saved by an older version stays loadable); keys the values lack keep their defaults.

  Raises:
    ConfigError naming the key that is unknown (strict) or whose value has the wrong type.
  """
  config = base_config()

  def update(node: ml_collections.ConfigDict, saved: dict, prefix: str):
    for key, value in saved.items():
      name = prefix + key
      if key not in node:
        if strict:
          raise ConfigError(
            f'config.{name} is not a key of base_config(): was it saved by another version?'
          )
        logging.warning('saved config key %s is unknown here; ignored.', name)
        continue
      if isinstance(node[key], ml_collections.ConfigDict):
        if not isinstance(value, dict):
          raise ConfigError(f'config.{name}={value!r} should be a group of keys.')
        update(node[key], value, name + '.')
        continue
      if isinstance(node[key], tuple) and isinstance(value, list):
        value = tuple(value)
      try:
        node[key] = value
      except TypeError as e:
        raise ConfigError(f'config.{name}={value!r}: {e}') from e

  update(config, values, '')
  return lock(config)


def load_json(directory: str, strict: bool = False) -> ml_collections.ConfigDict:
  """The locked config saved as `<directory>/config.json` by a run, an export or a conversion."""
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{path} not found: {directory!r} is not a run, export or converted-checkpoint directory.'
    )
  with open(path) as f:
    return from_dict(json.load(f), strict=strict)


def parse_arg(arg: str | None, **defaults):
  """Parses a config-file argument `a=1,b=x` (from `--config=file.py:a=1,b=x`).

  Only the keys given in `defaults` are allowed; values are cast to the default's type.
  """
  result = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ConfigError(
        f'config argument {item!r} is not allowed: expected key=value with key in {sorted(defaults)}.'
      )
    kind = type(defaults[key])
    result[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
  return ml_collections.ConfigDict(result)


def find_config_file(name: str) -> pathlib.Path:
  """A config file by path, or by name under the repository's `configs/` ('tiny.py',
  'eval/knn.py').

  The folder is looked for next to the package (editable install), in the working directory and
  in its parent (a notebook run from `notebooks/`).
  """
  path = pathlib.Path(name)
  if path.is_file():
    return path
  roots = [pathlib.Path(__file__).resolve().parent.parent, pathlib.Path.cwd()]
  roots.append(pathlib.Path.cwd().parent)
  for root in roots:
    candidate = root / 'configs' / name
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
    f'config file {name!r} not found as a path nor in {[str(r / "configs") for r in roots]}: '
    'run from a clone of the stop_jax repository.'
  )


def load_config_file(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of a file, as `--config=configs/NAME[:ARG]` gives it: `get_config(arg)`, or
  `get_config()` without an arg (the recipes take none)."""
  path = find_config_file(name)
  spec = importlib.util.spec_from_file_location(f'stop_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def vit_shape(model: ml_collections.ConfigDict) -> tuple[int, int, int, float]:
  """(width, depth, num_heads, mlp_ratio) of the encoder: the variant with any overrides."""
  w, d, h, r = VIT_VARIANTS[model.variant]
  return (
    model.width if model.width > 0 else w,
    model.depth if model.depth > 0 else d,
    model.num_heads if model.num_heads > 0 else h,
    model.mlp_ratio if model.mlp_ratio > 0 else r,
  )


class ConfigError(ValueError):
  """A config value outside its allowed range; the message names the key."""


def _check(ok: bool, key: str, value, allowed: str):
  if not ok:
    raise ConfigError(f'config.{key}={value!r} is not allowed: {allowed}.')


def _check_range(key: str, value, lo_open: bool = True):
  ok = (
    isinstance(value, tuple | list)
    and len(value) == 2
    and all(isinstance(v, int | float) for v in value)
    and (0 < value[0] if lo_open else 0 <= value[0])
    and value[0] <= value[1] <= 1
  )
  _check(ok, key, value, 'expected (lo, hi) with 0 < lo <= hi <= 1')


EVAL_PROTOCOLS = ('logreg', 'linear', 'knn')
EVAL_SOURCES = ('tfds', 'folder', 'digits', 'synthetic')
EVAL_LABELS = ('label', 'clevr_count', 'clevr_distance')
FEATURE_TYPES = ('last', 'last4')


def _validate_eval(e: ml_collections.ConfigDict):
  """Checks of the `eval` group (stop_jax.evaluate, the trainer's probe and k-NN)."""
  _check(
    len(e.probe_l2) >= 1 and all(v >= 0 for v in e.probe_l2),
    'eval.probe_l2',
    e.probe_l2,
    'a non-empty tuple of values >= 0',
  )
  for key in ('knn_every_steps',):
    _check(e[key] >= 0, f'eval.{key}', e[key], '>= 0 (0 = off)')
  for key in ('knn_max_examples', 'max_train_examples', 'max_test_examples'):
    _check(e[key] == -1 or e[key] > 0, f'eval.{key}', e[key], '-1 (all) or > 0')
  _check(e.knn_k >= 1, 'eval.knn_k', e.knn_k, '>= 1')
  _check(e.knn_temperature > 0, 'eval.knn_temperature', e.knn_temperature, '> 0')
  _check(e.protocol in EVAL_PROTOCOLS, 'eval.protocol', e.protocol, f'one of {EVAL_PROTOCOLS}')
  _check(
    len(e.feature_types) >= 1
    and len(set(e.feature_types)) == len(e.feature_types)
    and all(t in FEATURE_TYPES for t in e.feature_types),
    'eval.feature_types',
    e.feature_types,
    f'distinct values from {FEATURE_TYPES}',
  )
  _check(e.source in EVAL_SOURCES, 'eval.source', e.source, f'one of {EVAL_SOURCES}')
  _check(e.label in EVAL_LABELS, 'eval.label', e.label, f'one of {EVAL_LABELS}')
  _check(e.image_size == -1 or e.image_size > 0, 'eval.image_size', e.image_size, '-1 or > 0')
  _check(e.resize_ratio >= 1, 'eval.resize_ratio', e.resize_ratio, '>= 1')
  _check(
    e.linear_standardize_examples >= 0,
    'eval.linear_standardize_examples',
    e.linear_standardize_examples,
    '>= 0 (0 = raw features)',
  )
  for key in ('batch_size', 'linear_batch_size', 'linear_epochs', 'log_every_steps'):
    _check(e[key] > 0, f'eval.{key}', e[key], '> 0')
  _check(
    e.linear_optimizer in ('sgd', 'lars'),
    'eval.linear_optimizer',
    e.linear_optimizer,
    'sgd or lars',
  )
  _check(
    len(e.linear_lrs) >= 1 and all(v > 0 for v in e.linear_lrs),
    'eval.linear_lrs',
    e.linear_lrs,
    'a non-empty tuple of values > 0',
  )
  _check(0 <= e.linear_momentum < 1, 'eval.linear_momentum', e.linear_momentum, 'in [0, 1)')
  _check(e.linear_weight_decay >= 0, 'eval.linear_weight_decay', e.linear_weight_decay, '>= 0')
  _check(
    0 <= e.linear_warmup_epochs < e.linear_epochs,
    'eval.linear_warmup_epochs',
    e.linear_warmup_epochs,
    'in [0, linear_epochs)',
  )
  _check_range('eval.linear_crop_scale', e.linear_crop_scale)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None):
  """Raises ConfigError naming the first bad key. Cheap: call before compiling anything."""
  m = config.model
  _check(m.variant in VIT_VARIANTS, 'model.variant', m.variant, f'one of {sorted(VIT_VARIANTS)}')
  width, depth, heads, ratio = vit_shape(m)
  _check(m.patch_size > 0, 'model.patch_size', m.patch_size, 'a positive int')
  _check(
    m.image_size > 0 and m.image_size % m.patch_size == 0,
    'model.image_size',
    m.image_size,
    f'a positive multiple of model.patch_size={m.patch_size}',
  )
  _check(width % heads == 0, 'model.width', width, f'divisible by num_heads={heads}')
  _check(width % 4 == 0, 'model.width', width, 'divisible by 4 (2D sin-cos embedding)')
  _check(depth > 0, 'model.depth', depth, 'a positive int')
  _check(ratio > 0, 'model.mlp_ratio', ratio, 'positive')
  _check(m.dtype in ('float32', 'bfloat16'), 'model.dtype', m.dtype, 'float32 or bfloat16')
  _check(m.gelu in ('exact', 'tanh'), 'model.gelu', m.gelu, 'exact or tanh')
  _check(m.remat in ('none', 'block', 'dots'), 'model.remat', m.remat, 'none, block or dots')
  _check(
    config.xla_cpu_matmul in ('onednn', 'eigen', 'ynnpack'),
    'xla_cpu_matmul',
    config.xla_cpu_matmul,
    'onednn, eigen or ynnpack',
  )
  attn = ('auto', 'einsum', 'xla', 'cudnn')
  _check(m.attention in attn, 'model.attention', m.attention, f'one of {attn}')
  _check(
    m.attention != 'cudnn' or m.dtype == 'bfloat16',
    'model.attention',
    m.attention,
    'cudnn needs model.dtype=bfloat16 (the fused kernel has no float32 path)',
  )
  _check(
    m.target_dtype in ('float32', 'bfloat16'),
    'model.target_dtype',
    m.target_dtype,
    'float32 or bfloat16',
  )

  p = config.predictor
  p_heads = p.num_heads if p.num_heads > 0 else heads
  _check(p.width > 0 and p.width % 4 == 0, 'predictor.width', p.width, 'a positive multiple of 4')
  _check(
    p.width % p_heads == 0, 'predictor.width', p.width, f'divisible by its num_heads={p_heads}'
  )
  _check(p.depth > 0, 'predictor.depth', p.depth, 'a positive int')
  _check(
    p.pos_embed in ('sincos', 'learned'), 'predictor.pos_embed', p.pos_embed, 'sincos or learned'
  )

  s = config.stop
  _check(s.mode in STOP_MODES, 'stop.mode', s.mode, f'one of {STOP_MODES}')
  _check(
    isinstance(s.sigma, int | float) and s.sigma >= 0 and math.isfinite(s.sigma),
    'stop.sigma',
    s.sigma,
    'a finite standard deviation >= 0',
  )
  _check(s.reg in ('none', 'l1', 'l2'), 'stop.reg', s.reg, 'none, l1 or l2')
  _check(s.reg_weight >= 0, 'stop.reg_weight', s.reg_weight, '>= 0')

  k = config.mask
  _check(k.mode in MASK_MODES, 'mask.mode', k.mode, f'one of {MASK_MODES}')
  _check(k.num_targets >= 1, 'mask.num_targets', k.num_targets, '>= 1')
  _check_range('mask.target_scale', k.target_scale)
  _check_range('mask.context_scale', k.context_scale)
  _check(
    len(k.target_aspect) == 2 and 0 < k.target_aspect[0] <= k.target_aspect[1],
    'mask.target_aspect',
    k.target_aspect,
    'expected (lo, hi) with 0 < lo <= hi',
  )
  n_tokens = (m.image_size // m.patch_size) ** 2
  _check(0 <= k.min_keep < n_tokens, 'mask.min_keep', k.min_keep, f'in [0, {n_tokens})')
  for key in ('num_context_tokens', 'num_target_tokens'):
    v = k[key]
    _check(v == -1 or 0 < v <= n_tokens, f'mask.{key}', v, f'-1 (auto) or in [1, {n_tokens}]')

  _check(config.loss.type in ('smooth_l1', 'l2'), 'loss.type', config.loss.type, 'smooth_l1 or l2')
  _check(
    1 <= config.loss.num_target_layers <= depth,
    'loss.num_target_layers',
    config.loss.num_target_layers,
    f'in [1, depth={depth}]',
  )

  o = config.optim
  _check(o.epochs > 0, 'optim.epochs', o.epochs, '> 0')
  _check(
    0 <= o.warmup_epochs < o.epochs * o.ipe_scale,
    'optim.warmup_epochs',
    o.warmup_epochs,
    'in [0, epochs * ipe_scale)',
  )
  _check(o.ipe_scale > 0, 'optim.ipe_scale', o.ipe_scale, '> 0')
  for key in ('start_lr', 'lr', 'final_lr', 'weight_decay', 'final_weight_decay'):
    _check(o[key] >= 0, f'optim.{key}', o[key], '>= 0')
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, 'optim.b1/b2', (o.b1, o.b2), 'in [0, 1)')
  _check(o.grad_clip_norm >= 0, 'optim.grad_clip_norm', o.grad_clip_norm, '>= 0 (0 = off)')
  _check(
    0 <= o.ema_start <= o.ema_end <= 1,
    'optim.ema_start/ema_end',
    (o.ema_start, o.ema_end),
    '0 <= ema_start <= ema_end <= 1',
  )

  d = config.data
  _check(d.source in DATA_SOURCES, 'data.source', d.source, f'one of {DATA_SOURCES}')
  _check(d.source != 'tfds' or bool(d.name), 'data.name', d.name, 'a tfds dataset name')
  _check(
    d.source != 'folder' or bool(d.data_dir),
    'data.data_dir',
    d.data_dir,
    'the root of <root>/<split>/<class>/<image> (source=folder)',
  )
  _check(d.global_batch_size > 0, 'data.global_batch_size', d.global_batch_size, '> 0')
  _check(
    d.num_train_examples == -1 or d.num_train_examples > 0,
    'data.num_train_examples',
    d.num_train_examples,
    '-1 (from the data) or > 0',
  )
  _check_range('data.crop_scale', d.crop_scale)
  _check(
    isinstance(d.crop_ratio, tuple | list)
    and len(d.crop_ratio) == 2
    and 0 < d.crop_ratio[0] <= d.crop_ratio[1],
    'data.crop_ratio',
    d.crop_ratio,
    'expected (lo, hi) with 0 < lo <= hi',
  )
  _check(
    d.interpolation in INTERPOLATIONS,
    'data.interpolation',
    d.interpolation,
    f'one of {INTERPOLATIONS}',
  )
  _check(
    d.digits_upscale in INTERPOLATIONS,
    'data.digits_upscale',
    d.digits_upscale,
    f'one of {INTERPOLATIONS}',
  )
  _check(
    isinstance(d.color_jitter, int | float) and 0 <= d.color_jitter <= 2.5,
    'data.color_jitter',
    d.color_jitter,
    'a strength in [0, 2.5] (hue jitter 0.2 * strength must stay <= 0.5)',
  )
  for key in ('color_jitter_prob', 'grayscale_prob', 'blur_prob'):
    _check(0 <= d[key] <= 1, f'data.{key}', d[key], 'a probability in [0, 1]')
  _check(
    isinstance(d.blur_sigma, tuple | list)
    and len(d.blur_sigma) == 2
    and 0 < d.blur_sigma[0] <= d.blur_sigma[1] <= 50,
    'data.blur_sigma',
    d.blur_sigma,
    'expected (lo, hi) with 0 < lo <= hi <= 50 (pixels)',
  )
  _check(d.shuffle_window >= 1, 'data.shuffle_window', d.shuffle_window, '>= 1')
  if num_devices is not None:
    from stop_jax.runtime import sharding  # noqa: PLC0415 (sharding imports flax; keep this module light)

    try:
      data, fsdp, _ = sharding.mesh_shape(config, num_devices)
    except sharding.MeshError as e:
      raise ConfigError(str(e)) from None
    _check(
      d.global_batch_size % (data * fsdp) == 0,
      'data.global_batch_size',
      d.global_batch_size,
      f'a multiple of the batch-sharded devices (mesh data x fsdp = {data} x {fsdp})',
    )
  _check(
    config.checkpoint.every_steps >= 0,
    'checkpoint.every_steps',
    config.checkpoint.every_steps,
    '>= 0 (0 = only at the end)',
  )
  _validate_eval(config.eval)
  _check(config.checkpoint.keep >= 1, 'checkpoint.keep', config.checkpoint.keep, '>= 1')
  _check(
    config.checkpoint.every_minutes >= 0,
    'checkpoint.every_minutes',
    config.checkpoint.every_minutes,
    '>= 0 (0 = off)',
  )
  _check(
    config.checkpoint.keep_every >= 0,
    'checkpoint.keep_every',
    config.checkpoint.keep_every,
    '>= 0 (0 = off)',
  )
  _check(
    config.on_nonfinite in ('stop', 'skip'), 'on_nonfinite', config.on_nonfinite, 'stop or skip'
  )
  _check(
    config.max_consecutive_skips >= 1,
    'max_consecutive_skips',
    config.max_consecutive_skips,
    '>= 1',
  )
  _check(config.log_every_steps > 0, 'log_every_steps', config.log_every_steps, '> 0')
  _check(
    config.total_steps == -1 or config.total_steps > 0,
    'total_steps',
    config.total_steps,
    '-1 or > 0',
  )
