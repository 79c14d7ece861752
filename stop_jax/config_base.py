"""The one place where every config key is declared, documented and checked.

Config files in `configs/` start from `base_config()` and change values; they never add keys
(the config is locked, so a typo such as `--config.stop.sgima=0.1` fails at once). `validate`
turns every value a user can set into an early, named error before anything is compiled.
"""

from __future__ import annotations

import math

import ml_collections

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
DATA_SOURCES = ('digits', 'tfds', 'synthetic')


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
  c.model.remat = 'none'  # none | block: recompute each block in the backward pass.
  c.model.scan_blocks = True  # nn.scan over blocks: compile time flat in depth.

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
  c.data.source = 'tfds'  # One of DATA_SOURCES.
  c.data.name = 'imagenet2012'  # tfds name (source=tfds).
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.data_dir = ''  # tfds data_dir ('' = the tfds default).
  c.data.global_batch_size = 2048
  # Examples per epoch; -1 = read from the dataset's metadata. Sets steps_per_epoch.
  c.data.num_train_examples = -1
  c.data.crop_scale = (0.3, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.shuffle_buffer = 10_000
  c.data.digits_upscale = 'bilinear'  # digits: how 8x8 digits are resized to image_size.

  c.eval = ml_collections.ConfigDict()
  c.eval.probe = True  # Linear probe of the target encoder at the end of training.
  c.eval.probe_random_init = True  # Also probe a randomly initialised encoder (reference).
  c.eval.probe_l2 = (1e-4, 1e-3, 1e-2, 1e-1)  # Swept on a held-out part of the train split.
  c.eval.probe_max_examples = 50_000

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000  # 0 = only at the end.
  c.checkpoint.keep = 3

  c.log_every_steps = 50
  c.total_steps = -1  # -1 = epochs * steps_per_epoch; set to stop early (schedules unchanged).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all devices on the data axis.
  return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Freezes the set of keys: assigning a key that base_config() did not declare raises."""
  config.lock()
  return config


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
  _check(m.remat in ('none', 'block'), 'model.remat', m.remat, 'none or block')

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
  _check(d.global_batch_size > 0, 'data.global_batch_size', d.global_batch_size, '> 0')
  _check_range('data.crop_scale', d.crop_scale)
  if num_devices is not None:
    _check(
      d.global_batch_size % num_devices == 0,
      'data.global_batch_size',
      d.global_batch_size,
      f'a multiple of the device count ({num_devices})',
    )
  _check(
    config.checkpoint.every_steps >= 0,
    'checkpoint.every_steps',
    config.checkpoint.every_steps,
    '>= 0 (0 = only at the end)',
  )
  _check(config.checkpoint.keep >= 1, 'checkpoint.keep', config.checkpoint.keep, '>= 1')
  _check(config.log_every_steps > 0, 'log_every_steps', config.log_every_steps, '> 0')
  _check(
    config.total_steps == -1 or config.total_steps > 0,
    'total_steps',
    config.total_steps,
    '-1 or > 0',
  )
