r"""Imports official I-JEPA and StoP PyTorch checkpoints into our param trees.

Command:
  python -m stop_jax.tools.convert --torch_checkpoint=IN1K-vit.h.14-300e.pth.tar \
    --config=configs/vith14.py --output=DIR [--which=target_encoder] [--config.model.KEY=...]

An official `.pth.tar` is a dict with `encoder`, `predictor`, `target_encoder` state dicts (keys
with or without the DDP `module.` prefix) next to `opt`, `epoch`, ... The config must describe
the checkpoint's architecture (variant or width/depth overrides, patch size, predictor width and
depth, stop.mode); every key and shape is checked and a mismatch is an error that lists the
mismatched keys. The one thing a checkpoint cannot tell us is the head count (qkv has the same
shape for any head count): it comes from the config, as in the official code.

DIR is laid out as `stop_jax.eval.converted` describes (config.json, conversion.json and a
training run's checkpoint layout without optimiser state): evaluation reads it from there.

torch is imported only to read the `.pth` file (`pip install 'stop_jax[torch]'`); the conversion
itself, `convert_state_dicts`, is pure numpy, and which official key and shape each of our params
has is `stop_jax.tools.official_layout`.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from stop_jax import config as config_lib
from stop_jax.eval import converted
from stop_jax.models.layers import sincos_2d
from stop_jax.runtime import cli, fileio
from stop_jax.tools import official_layout

PARTS = ('encoder', 'predictor', 'target_encoder')
DDP_PREFIX = 'module.'
# The official sin-cos buffers and our table are both float64 math rounded to float32.
POS_TOLERANCE = 1e-5


class ConversionError(cli.UserError, ValueError):
  """A checkpoint that does not fit the config, or a file that is not an official checkpoint."""


def strip_ddp_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the `module.` prefix DistributedDataParallel puts on every key (if present)."""
  out = {}
  for k, v in state_dict.items():
    name = k[len(DDP_PREFIX) :] if k.startswith(DDP_PREFIX) else k
    if name in out:
      raise ConversionError(
        f'key {name!r} appears both with and without the {DDP_PREFIX!r} prefix.'
      )
    out[name] = v
  return out


def _ranges(indices) -> str:
  """[0, 1, 2, 5] -> '0-2,5'."""
  idx, out = sorted(set(indices)), []
  start = prev = idx[0]
  for i in [*idx[1:], None]:
    if i is not None and i == prev + 1:
      prev = i
      continue
    out.append(str(start) if start == prev else f'{start}-{prev}')
    if i is not None:
      start = prev = i
  return ','.join(out)


def _summarise(items: list[tuple[str, str]]) -> list[str]:
  """(key, detail) pairs with per-block keys folded: 'blocks.{2-11}.attn.qkv.weight detail'."""
  groups: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
  lines = []
  for key, detail in sorted(items):
    m = official_layout.BLOCK_KEY.match(key)
    if m:
      groups[(f'{m[1]}.{{}}.{m[3]}', detail)].append(int(m[2]))
    else:
      lines.append(f'{key}{detail}')
  lines += [f'{pattern.format("{" + _ranges(i) + "}")}{d}' for (pattern, d), i in groups.items()]
  return sorted(lines)


def _mismatch_error(
  part: str,
  sd: Mapping[str, np.ndarray],
  config: ml_collections.ConfigDict,
  missing: list[tuple[str, str]],
  unknown: list[tuple[str, str]],
  problems: list[tuple[str, str]],
) -> ConversionError:
  """Every (key, detail) that does not fit, folded per block, and what each side describes."""
  lines = [f'{part}: the checkpoint does not match the config.']
  for title, items in (
    ('in the config, missing from the checkpoint', missing),
    ('in the checkpoint, not in the config', unknown),
    ('mismatched', problems),
  ):
    if items:
      lines.append(f'  {title}:')
      lines += [f'    {x}' for x in _summarise(items)]
  lines.append(f'  checkpoint: {official_layout.describe_state_dict(part, sd)}')
  lines.append(f'  config:     {official_layout.describe_config(part, config)}')
  if any('noise_proj' in k for k, _ in missing):
    lines.append("  stop.mode='untied' has a second projection A' that no official code has.")
  return ConversionError('\n'.join(lines))


def _check_pos_embed(
  name: str, value: np.ndarray, width: int, grid: int, problems: list, notes: list
) -> None:
  """An official fixed sin-cos buffer must equal our table; our code never reads it."""
  if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != width:
    problems.append((name, f': checkpoint {list(value.shape)}, config expects [1, N, {width}]'))
    return
  n = value.shape[1]
  g = math.isqrt(n)
  if g * g != n:
    notes.append(f'{name} has {n} positions, not a square grid: not checked against sin-cos.')
    return
  if g != grid:
    notes.append(
      f'{name} was built for a {g}x{g} grid; the config gives {grid}x{grid}: we compute the exact'
      ' sin-cos table at the config grid (the official code would interpolate its table).'
    )
  diff = float(np.max(np.abs(value[0] - sincos_2d(g, g, width))))
  if diff > POS_TOLERANCE:
    hint = ' (learned? see predictor.pos_embed)' if name == 'predictor_pos_embed' else ''
    notes.append(
      f'{name} differs from our fixed 2D sin-cos table by up to {diff:.3g}{hint}: our model uses'
      " the sin-cos table, so outputs will differ from the checkpoint's own model."
    )


def _convert_part(
  part: str, sd: Mapping[str, np.ndarray], config: ml_collections.ConfigDict
) -> tuple[dict, list[str]]:
  """One official state dict (prefix already stripped) -> (our param tree, notes to log)."""
  leaves = official_layout.plan(part, config)
  expected = {k: leaf.torch_shape for leaf in leaves for k in leaf.torch_keys}
  grid = config.model.image_size // config.model.patch_size
  problems: list[tuple[str, str]] = []
  notes: list[str] = []
  handled = set()
  # Fixed buffers: checked against our table (any grid is accepted), never converted.
  buffer, width = (
    ('predictor_pos_embed', config.predictor.width)
    if part == 'predictor'
    else ('pos_embed', config_lib.vit_shape(config.model)[0])
  )
  if buffer not in expected:
    if buffer in sd:
      handled.add(buffer)
      _check_pos_embed(buffer, sd[buffer], width, grid, problems, notes)
    else:
      notes.append(f'no {buffer} in the checkpoint (not needed: our sin-cos table is fixed).')
  if part == 'predictor' and 'mask_token' not in expected and 'mask_token' in sd:
    handled.add('mask_token')
    notes.append(
      f"dropping the checkpoint's mask_token: stop.mode={config.stop.mode!r} uses the bias of"
      ' predictor_embed as the mask token, as the official StoP predictor does (it creates'
      ' mask_token but never adds it). For an I-JEPA checkpoint, whose predictor does add it,'
      ' convert with --config.stop.mode=off to keep it.'
    )

  missing = [(k, f' {list(s)}') for k, s in expected.items() if k not in sd]
  unknown = [
    (k, f' {list(np.shape(v))}') for k, v in sd.items() if k not in set(expected) | handled
  ]
  problems += [
    (k, f': checkpoint {list(np.shape(sd[k]))}, config expects {list(s)}')
    for k, s in expected.items()
    if k in sd and tuple(np.shape(sd[k])) != s
  ]
  if missing or unknown or problems:
    raise _mismatch_error(part, sd, config, missing, unknown, problems)

  flat = {}
  for leaf in leaves:
    ws = [
      official_layout.to_ours(leaf.path, np.asarray(sd[k], np.float32)) for k in leaf.torch_keys
    ]
    flat[leaf.path] = np.stack(ws) if leaf.stacked else ws[0]
  return traverse_util.unflatten_dict(flat), notes


def convert_state_dicts(
  state_dicts: Mapping[str, Mapping[str, np.ndarray]], config: ml_collections.ConfigDict
) -> dict[str, dict]:
  """Official state dicts -> our param trees (pure; notes are logged).

  Args:
    state_dicts: any non-empty subset of {'encoder', 'predictor', 'target_encoder'}, each a
      PyTorch state dict as numpy arrays (keys with or without the `module.` prefix).
    config: our config describing the checkpoint's architecture (see the module docstring).
  Returns:
    The same parts as float32 param trees for `apply({'params': tree}, ...)` of
    `models.build_encoder(config)` (encoder, target_encoder) and `models.build_predictor(config)`
    (predictor), scan-stacked or per-block as `config.model.scan_blocks` says.
  Raises:
    ConversionError: an unknown part, or keys / shapes that do not fit the config (every
      mismatched key is listed).
  """
  config_lib.validate(config)
  bad = sorted(set(state_dicts) - set(PARTS))
  if bad or not state_dicts:
    raise ConversionError(
      f'parts {bad or "(none)"} are not allowed: a non-empty subset of {PARTS}.'
    )
  if config.model.gelu != 'exact':
    logging.warning(
      'config.model.gelu=%r: the official models use the exact (erf) GELU, so features will differ'
      ' slightly from theirs.',
      config.model.gelu,
    )
  out, errors = {}, []
  for part in PARTS:
    if part in state_dicts:
      try:
        out[part], notes = _convert_part(part, strip_ddp_prefix(state_dicts[part]), config)
      except ConversionError as e:  # Report every part's mismatches at once.
        errors.append(str(e))
        continue
      for note in notes:
        logging.warning('%s: %s', part, note)
  if errors:
    errors.append(
      'Describe the checkpoint in the config: model.variant (or model.width/depth/num_heads/'
      'mlp_ratio), model.patch_size, predictor.width/depth, stop.mode.'
    )
    raise ConversionError('\n'.join(errors))
  return out


# ---- I/O at the edges --------------------------------------------------------------------------


def read_torch_checkpoint(
  path: str, parts: tuple[str, ...] | None = None, trust_pickle: bool = False
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
  """Reads an official `.pth(.tar)` file.

  Args:
    path: the checkpoint file.
    parts: which of PARTS to read; None = every one the file has.
    trust_pickle: unpickle arbitrary objects (only for files you trust). Official checkpoints
      hold only tensors and plain values and load without it.
  Returns:
    ({part: {key: float32 array}}, {other top-level key: value if a plain int/float/str}).
  """
  try:
    import torch  # noqa: PLC0415 (optional dependency, needed only for .pth files)
  except ImportError as e:
    raise ImportError(
      "reading PyTorch checkpoints needs torch: pip install 'stop_jax[torch]'."
    ) from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--torch_checkpoint={path!r}: no such file.')
  try:
    # mmap keeps a ViT-G checkpoint (with its optimiser state) out of RAM; only the zip format
    # that torch.save writes since 1.6 supports it.
    ckpt = torch.load(
      path, map_location='cpu', weights_only=not trust_pickle, mmap=zipfile.is_zipfile(path)
    )
  except pickle.UnpicklingError as e:
    raise ConversionError(
      f'{path} holds pickled objects other than tensors and plain values. If you trust the'
      f' file, rerun with --trust_pickle. torch said: {e}'
    ) from e
  if not isinstance(ckpt, Mapping):
    raise ConversionError(f'{path} holds a {type(ckpt).__name__}, not a dict of state dicts.')
  present = [p for p in PARTS if p in ckpt]
  wanted = present if parts is None else list(parts)
  absent = [p for p in wanted if p not in ckpt]
  if not present or absent:
    raise ConversionError(
      f'{path} lacks {absent or list(PARTS)}: it has top-level keys {sorted(map(str, ckpt))};'
      f' an official checkpoint has {list(PARTS)} (choose with --which).'
    )
  state_dicts = {}
  for p in wanted:
    sd = ckpt[p]
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
      raise ConversionError(f'{path}: {p!r} is not a state dict of tensors.')
    state_dicts[p] = {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()}
  extra = {k: v for k, v in ckpt.items() if k not in PARTS and isinstance(v, int | float | str)}
  return state_dicts, extra


def convert_file(
  torch_checkpoint: str,
  config: ml_collections.ConfigDict,
  output: str,
  which: str = 'all',
  trust_pickle: bool = False,
) -> dict[str, dict]:
  """Reads, converts and writes one official checkpoint; returns the converted params."""
  config_lib.validate(config)
  parts = None if which == 'all' else tuple(filter(None, which.split(',')))
  if parts is not None and (not parts or set(parts) - set(PARTS)):
    raise ConversionError(f'--which={which!r} is not allowed: "all" or a comma list of {PARTS}.')
  if fileio.exists(os.path.join(output, 'config.json')):
    raise FileExistsError(f'--output={output} already holds config.json: choose a new directory.')
  state_dicts, extra = read_torch_checkpoint(torch_checkpoint, parts, trust_pickle)
  logging.info('converting %s from %s', sorted(state_dicts), torch_checkpoint)
  params = convert_state_dicts(state_dicts, config)
  info = {'source': os.path.abspath(torch_checkpoint), 'checkpoint_values': extra}
  converted.write_converted(output, config, params, info)
  logging.info('wrote %s to %s', sorted(params), output)
  return params


def _define_flags():
  # Only when run as a script: stop_jax.main defines --config too, and both modules may be
  # imported in one process (tests, notebooks).
  config_flags.DEFINE_config_file(
    'config', None, 'Config describing the checkpoint (configs/*.py).'
  )
  flags.DEFINE_string('torch_checkpoint', None, 'Official I-JEPA / StoP .pth.tar file.')
  flags.DEFINE_string(
    'output', None, 'New directory (local or gs://...) for config.json and the converted params.'
  )
  flags.DEFINE_string(
    'which', 'all', f'"all" (every part the file has) or a comma list of {PARTS}.'
  )
  flags.DEFINE_bool('trust_pickle', False, 'Unpickle arbitrary objects: only for trusted files.')
  flags.mark_flags_as_required(['config', 'torch_checkpoint', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  convert_file(f.torch_checkpoint, f.config, f.output, f.which, f.trust_pickle)


if __name__ == '__main__':
  _define_flags()
  # ConversionError and ConfigError are user errors; so are an unreadable file and a missing torch.
  cli.run(main, user_errors=(OSError, ImportError))
