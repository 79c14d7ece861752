"""`validate`: every value a user can set becomes an early, named error before anything compiles.

One check per group of `schema.base_config()`, in the schema's order; each reads its own group
and whatever it depends on (the encoder's shape, the patch grid). A message names the key, its
value and what is allowed.
"""

from __future__ import annotations

import math

import ml_collections

from stop_jax.config.schema import (
  DATA_SOURCES,
  DAVIS_POS_EMBED,
  EVAL_LABELS,
  EVAL_PROTOCOLS,
  EVAL_SOURCES,
  FEATURE_TYPES,
  FINETUNE_SOURCES,
  GRAD_CLIP_SCOPES,
  HEAD_NORMS,
  INTERPOLATIONS,
  LOWRES_TARGETS,
  MASK_MODES,
  MULTI_LAYER_TARGETS,
  SHAPES_LABELS,
  STOP_MODES,
  VIT_VARIANTS,
  vit_shape,
)
from stop_jax.runtime import cli


class ConfigError(cli.UserError, ValueError):
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


def _num_tokens(model: ml_collections.ConfigDict) -> int:
  """Tokens per image: the patch grid's size."""
  return (model.image_size // model.patch_size) ** 2


def _check_model(config: ml_collections.ConfigDict):
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


def _check_predictor(config: ml_collections.ConfigDict):
  p = config.predictor
  p_heads = p.num_heads if p.num_heads > 0 else vit_shape(config.model)[2]
  _check(p.width > 0 and p.width % 4 == 0, 'predictor.width', p.width, 'a positive multiple of 4')
  _check(
    p.width % p_heads == 0, 'predictor.width', p.width, f'divisible by its num_heads={p_heads}'
  )
  _check(p.depth > 0, 'predictor.depth', p.depth, 'a positive int')
  _check(
    p.pos_embed in ('sincos', 'learned'), 'predictor.pos_embed', p.pos_embed, 'sincos or learned'
  )


def _check_stop(config: ml_collections.ConfigDict):
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


def _check_mask(config: ml_collections.ConfigDict):
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
  n_tokens = _num_tokens(config.model)
  _check(0 <= k.min_keep < n_tokens, 'mask.min_keep', k.min_keep, f'in [0, {n_tokens})')
  for key in ('num_context_tokens', 'num_target_tokens'):
    v = k[key]
    _check(v == -1 or 0 < v <= n_tokens, f'mask.{key}', v, f'-1 (auto) or in [1, {n_tokens}]')


def _check_loss(config: ml_collections.ConfigDict):
  depth = vit_shape(config.model)[1]
  _check(config.loss.type in ('smooth_l1', 'l2'), 'loss.type', config.loss.type, 'smooth_l1 or l2')
  _check(
    1 <= config.loss.num_target_layers <= depth,
    'loss.num_target_layers',
    config.loss.num_target_layers,
    f'in [1, depth={depth}]',
  )
  for key, allowed in (('multi_layer_target', MULTI_LAYER_TARGETS), ('lowres', LOWRES_TARGETS)):
    _check(config.loss[key] in allowed, f'loss.{key}', config.loss[key], f'one of {allowed}')
  grid = config.model.image_size // config.model.patch_size
  coarse_ok = config.loss.lowres == 'none' or grid % 2 == 0
  _check(coarse_ok, 'loss.lowres', config.loss.lowres, f"'none' with an odd {grid}x{grid} grid")
  _check(config.loss.lowres_weight >= 0, 'loss.lowres_weight', config.loss.lowres_weight, '>= 0')


def _check_optim(config: ml_collections.ConfigDict):
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
    o.grad_clip_scope in GRAD_CLIP_SCOPES,
    'optim.grad_clip_scope',
    o.grad_clip_scope,
    f'one of {GRAD_CLIP_SCOPES}',
  )
  for key in ('constant_lr_after_epoch', 'constant_wd_after_epoch'):
    _check(
      o[key] == -1 or 0 <= o[key] <= o.epochs * o.ipe_scale,
      f'optim.{key}',
      o[key],
      '-1 (never) or in [0, epochs * ipe_scale]',
    )
  _check(
    0 <= o.ema_start <= o.ema_end <= 1,
    'optim.ema_start/ema_end',
    (o.ema_start, o.ema_end),
    '0 <= ema_start <= ema_end <= 1',
  )


def _check_data(config: ml_collections.ConfigDict):
  d = config.data
  _check(d.source in DATA_SOURCES, 'data.source', d.source, f'one of {DATA_SOURCES}')
  _check(
    d.shapes_label in SHAPES_LABELS, 'data.shapes_label', d.shapes_label, f'one of {SHAPES_LABELS}'
  )
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
  for key in ('interpolation', 'digits_upscale'):
    _check(d[key] in INTERPOLATIONS, f'data.{key}', d[key], f'one of {INTERPOLATIONS}')
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


def _check_eval(config: ml_collections.ConfigDict):
  """The `eval` group: stop_jax.evaluate, the trainer's probe and k-NN."""
  e = config.eval
  _check(
    len(e.probe_l2) >= 1 and all(v >= 0 for v in e.probe_l2),
    'eval.probe_l2',
    e.probe_l2,
    'a non-empty tuple of values >= 0',
  )
  _check(e.knn_every_steps >= 0, 'eval.knn_every_steps', e.knn_every_steps, '>= 0 (0 = off)')
  for key in ('knn_max_examples', 'max_train_examples', 'max_test_examples'):
    _check(e[key] == -1 or e[key] > 0, f'eval.{key}', e[key], '-1 (all) or > 0')
  _check(e.knn_k >= 1, 'eval.knn_k', e.knn_k, '>= 1')
  _check(e.knn_temperature > 0, 'eval.knn_temperature', e.knn_temperature, '> 0')
  _check(
    e.health_every_steps >= -1,
    'eval.health_every_steps',
    e.health_every_steps,
    '-1 (every log step), 0 (off) or > 0',
  )
  _check(e.health_examples >= 2, 'eval.health_examples', e.health_examples, '>= 2')
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
  family = e.label.split('_')[0]
  _check(
    e.label == 'label'
    or (
      (family == 'clevr') == (e.source == 'tfds') and (family == 'shapes') == (e.source == 'shapes')
    ),
    'eval.label',
    e.label,
    'clevr_* with eval.source=tfds, shapes_* with eval.source=shapes',
  )
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
  _check_davis(e)


def _check_davis(e: ml_collections.ConfigDict):
  """The eval.davis_* keys (protocol=davis)."""
  for key in ('davis_split', 'davis_resolution'):
    _check(isinstance(e[key], str) and e[key], f'eval.{key}', e[key], 'a non-empty name')
  lows = {'davis_short_side': 1, 'davis_long_multiple': 1, 'davis_topk': 1}
  lows |= {'davis_n_last_frames': 0, 'davis_size_mask_neighborhood': 0}
  for key, lo in lows.items():
    _check(e[key] >= lo, f'eval.{key}', e[key], f'>= {lo}')
  for key in ('davis_temperature', 'davis_bound_th'):
    _check(e[key] > 0, f'eval.{key}', e[key], '> 0')
  pos, seqs = e.davis_pos_embed, e.davis_sequences
  _check(pos in DAVIS_POS_EMBED, 'eval.davis_pos_embed', pos, f'one of {DAVIS_POS_EMBED}')
  ok = all(isinstance(n, str) and n for n in seqs)
  _check(ok, 'eval.davis_sequences', seqs, 'a tuple of sequence names (empty = the whole split)')


def _check_finetune(config: ml_collections.ConfigDict):
  """The finetune group (read by stop_jax.finetune only; its defaults always pass)."""
  f = config.finetune
  src = f.source
  _check(src in FINETUNE_SOURCES, 'finetune.source', src, f'one of {FINETUNE_SOURCES}')
  _check(src != 'folder' or bool(f.data_dir), 'finetune.data_dir', f.data_dir, 'the folder root')
  _check(not f.file_list or src == 'folder', 'finetune.file_list', f.file_list, 'source=folder')
  for key in ('max_train_examples', 'max_test_examples', 'image_size', 'init_step'):
    _check(f[key] == -1 or f[key] > 0, f'finetune.{key}', f[key], '-1 or > 0')
  _check(f.resize_ratio >= 1, 'finetune.resize_ratio', f.resize_ratio, '>= 1')
  for key in ('batch_size', 'epochs', 'blr', 'eval_batch_size', 'log_every_steps'):
    _check(f[key] > 0, f'finetune.{key}', f[key], '> 0')
  _check(
    0 <= f.warmup_epochs < f.epochs,
    'finetune.warmup_epochs',
    f.warmup_epochs,
    f'in [0, finetune.epochs={f.epochs})',
  )
  for key in ('min_lr', 'weight_decay', 'grad_clip_norm', 'mixup', 'cutmix', 'head_init_std'):
    _check(f[key] >= 0, f'finetune.{key}', f[key], '>= 0')
  _check(0 <= f.b1 < 1 and 0 <= f.b2 < 1, 'finetune.b1/b2', (f.b1, f.b2), 'in [0, 1)')
  _check(0 < f.layer_decay <= 1, 'finetune.layer_decay', f.layer_decay, 'in (0, 1] (1 = off)')
  for key in ('drop_path', 'label_smoothing'):
    _check(0 <= f[key] < 1, f'finetune.{key}', f[key], 'in [0, 1)')
  for key in ('mixup_prob', 'mixup_switch_prob', 'randaug_prob', 'reprob'):
    _check(0 <= f[key] <= 1, f'finetune.{key}', f[key], 'a probability in [0, 1]')
  _check_range('finetune.crop_scale', f.crop_scale)
  interp = f.interpolation
  _check(interp in INTERPOLATIONS, 'finetune.interpolation', interp, f'one of {INTERPOLATIONS}')
  _check(f.head_norm in HEAD_NORMS, 'finetune.head_norm', f.head_norm, f'one of {HEAD_NORMS}')
  _check(f.randaug_num_ops >= 0, 'finetune.randaug_num_ops', f.randaug_num_ops, '>= 0 (0 = off)')
  m = f.randaug_magnitude
  _check(0 <= m <= 10, 'finetune.randaug_magnitude', m, 'in [0, 10]')
  _check(
    f.randaug_magnitude_std >= 0, 'finetune.randaug_magnitude_std', f.randaug_magnitude_std, '>= 0'
  )
  _check(f.eval_every_epochs > 0, 'finetune.eval_every_epochs', f.eval_every_epochs, '> 0')


def _check_checkpoint(config: ml_collections.ConfigDict):
  ck = config.checkpoint
  _check(
    ck.every_steps >= 0, 'checkpoint.every_steps', ck.every_steps, '>= 0 (0 = only at the end)'
  )
  _check(ck.keep >= 1, 'checkpoint.keep', ck.keep, '>= 1')
  _check(ck.every_minutes >= 0, 'checkpoint.every_minutes', ck.every_minutes, '>= 0 (0 = off)')
  _check(ck.keep_every >= 0, 'checkpoint.keep_every', ck.keep_every, '>= 0 (0 = off)')


def _check_run_control(config: ml_collections.ConfigDict):
  """The top-level keys (schema._run_control)."""
  c = config
  _check(c.on_nonfinite in ('stop', 'skip'), 'on_nonfinite', c.on_nonfinite, 'stop or skip')
  _check(c.max_consecutive_skips >= 1, 'max_consecutive_skips', c.max_consecutive_skips, '>= 1')
  d = c.divergence
  _check(d.action in ('stop', 'skip'), 'divergence.action', d.action, 'stop or skip')
  for key in ('loss_spike_factor', 'update_spike_factor'):
    _check(d[key] == 0 or d[key] > 1, f'divergence.{key}', d[key], '0 (off) or > 1')
  for key in ('max_update_norm', 'max_update_ratio'):
    _check(d[key] >= 0, f'divergence.{key}', d[key], '>= 0 (0 = off)')
  _check(d.window >= 1, 'divergence.window', d.window, '>= 1')
  _check(d.warmup_steps >= 1, 'divergence.warmup_steps', d.warmup_steps, '>= 1')
  _check(
    c.xla_cpu_matmul in ('onednn', 'eigen', 'ynnpack'),
    'xla_cpu_matmul',
    c.xla_cpu_matmul,
    'onednn, eigen or ynnpack',
  )
  _check(c.log_every_steps > 0, 'log_every_steps', c.log_every_steps, '> 0')
  _check(c.total_steps == -1 or c.total_steps > 0, 'total_steps', c.total_steps, '-1 or > 0')


def _check_mesh(config: ml_collections.ConfigDict, num_devices: int | None):
  """The dcn axes are slice counts; with num_devices, the mesh fits them and the global batch
  splits over its batch-sharded axes. (The slice count is checked where the devices are known:
  sharding.make_mesh.)"""
  for key in ('dcn_data', 'dcn_fsdp'):
    value = config.mesh[key]
    _check(value >= 1, f'mesh.{key}', value, 'a positive number of slices (1 = inside each slice)')
  if num_devices is None:
    return
  from stop_jax.runtime import sharding  # noqa: PLC0415 (sharding imports flax; keep this module light)

  try:
    data, fsdp, _ = sharding.mesh_shape(config, num_devices)
    sharding.split_over_slices(config, num_devices)  # each dcn axis divides its mesh axis
  except sharding.MeshError as e:
    raise ConfigError(str(e)) from None
  batch = config.data.global_batch_size
  _check(
    batch % (data * fsdp) == 0,
    'data.global_batch_size',
    batch,
    f'a multiple of the batch-sharded devices (mesh data x fsdp = {data} x {fsdp})',
  )


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None):
  """Raises ConfigError naming the first bad key. Cheap: call before compiling anything.

  With num_devices, also checks the mesh against that many devices.
  """
  _check_model(config)
  _check_predictor(config)
  _check_stop(config)
  _check_mask(config)
  _check_loss(config)
  _check_optim(config)
  _check_data(config)
  _check_eval(config)
  _check_finetune(config)
  _check_checkpoint(config)
  _check_run_control(config)
  _check_mesh(config, num_devices)
