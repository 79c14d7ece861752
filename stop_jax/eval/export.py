r"""Inference-only export of a run's target encoder.

  python -m stop_jax.eval.export --workdir=WORKDIR [--step=N] [--output=DIR]

writes to DIR (default WORKDIR/export/step_N):

- `encoder_params.npz`: the EMA target encoder's params only (no predictor, no context
  encoder, no optimiser state: a fraction of a checkpoint), one array per '/'-joined param path,
  readable with plain numpy;
- `config.json`: the run's resolved config, so `models.build_encoder` rebuilds the module;
- `export.json`: where it came from (workdir, step), param count, dtype, bytes.

`load_exported(DIR) -> (config, params)` reads it back; `stop_jax.evaluate` and the notebooks
accept such a directory wherever they take a run's workdir.
"""

from __future__ import annotations

import io
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from stop_jax import config as config_lib
from stop_jax.runtime import checkpointing, cli, fileio

PARAMS_FILE = 'encoder_params.npz'
CONFIG_FILE = 'config.json'
INFO_FILE = 'export.json'
FORMAT = 'stop_jax.export/1'
_BFLOAT16 = 'bfloat16'  # np.savez keeps bfloat16 only as raw bytes: stored as a uint16 view.


def flatten_params(params) -> dict[str, np.ndarray]:
  """{'a': {'b': x}} -> {'a/b': host array x}."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)):
    out['/'.join(str(k.key) for k in path)] = np.asarray(jax.device_get(leaf))
  return out


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
  """Inverse of flatten_params."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def is_export_dir(directory: str) -> bool:
  return fileio.exists(os.path.join(directory, INFO_FILE)) and fileio.exists(
    os.path.join(directory, PARAMS_FILE)
  )


def save_exported(directory: str, config, params, info: dict | None = None) -> dict:
  """Writes params + config (+ info) in the export format; returns the info written.

  Also usable by importers of other checkpoints (e.g. the official PyTorch weights) so that
  every tool reads one format. `directory` may be local or an object store (gs://...); each
  file is written atomically (`fileio`).
  """
  flat = flatten_params(params)
  dtypes = {k: str(v.dtype) for k, v in flat.items()}
  stored = {k: (v.view(np.uint16) if dtypes[k] == _BFLOAT16 else v) for k, v in flat.items()}
  info = {
    'format': FORMAT,
    **(info or {}),
    'num_params': int(sum(v.size for v in flat.values())),
    'bytes': int(sum(v.nbytes for v in flat.values())),
    'dtypes': sorted(set(dtypes.values())),
    'bfloat16_params': sorted(k for k, d in dtypes.items() if d == _BFLOAT16),
  }
  fileio.makedirs(directory)
  buffer = io.BytesIO()
  np.savez(buffer, **stored)
  fileio.write_bytes(os.path.join(directory, PARAMS_FILE), buffer.getbuffer())
  fileio.write_text(os.path.join(directory, CONFIG_FILE), config.to_json_best_effort(indent=2))
  fileio.write_json(os.path.join(directory, INFO_FILE), info, indent=2)
  return info


def load_exported(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params) of an export directory; params are host numpy arrays.

  Use: `encoder = models.build_encoder(config); encoder.apply({'params': params}, images)`.
  """
  if not is_export_dir(directory):
    raise FileNotFoundError(
      f'{directory} is not an export directory (needs {PARAMS_FILE} and {INFO_FILE}); write one '
      'with `python -m stop_jax.eval.export --workdir=RUN`.'
    )
  info = fileio.read_json(os.path.join(directory, INFO_FILE))
  if info.get('format') != FORMAT:
    raise ValueError(f'{directory}: format {info.get("format")!r}, this code reads {FORMAT!r}.')
  bf16 = set(info.get('bfloat16_params', ()))
  with np.load(io.BytesIO(fileio.read_bytes(os.path.join(directory, PARAMS_FILE)))) as data:
    flat = {k: (data[k].view(jax.numpy.bfloat16) if k in bf16 else data[k]) for k in data.files}
  return config_lib.load_json(directory), unflatten_params(flat)


def export(workdir: str, step: int | None = None, output: str | None = None) -> str:
  """Exports the target encoder of WORKDIR's checkpoint `step` (latest if None); returns DIR."""
  config = config_lib.load_json(workdir)
  step, tree = checkpointing.load_checkpoint(workdir, step)
  params = tree['target_params']
  output = output or os.path.join(workdir, 'export', f'step_{step}')
  if jax.process_index() == 0:
    info = save_exported(
      output, config, params, {'source': fileio.resolve(workdir), 'step': int(step)}
    )
    logging.info(
      'exported the target encoder of %s step %d to %s: %.2fM params, %.1f MB',
      workdir,
      step,
      output,
      info['num_params'] / 1e6,
      info['bytes'] / 1e6,
    )
  return output


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  print(export(flags.FLAGS.workdir, flags.FLAGS.step, flags.FLAGS.output))


def _define_flags():
  # Defined only when run as a program, so importing this module (evaluate, notebooks) never
  # collides with another tool's flags of the same name.
  flags.DEFINE_string('workdir', None, 'Run directory holding config.json and checkpoints/.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('output', None, 'Output directory (default: WORKDIR/export/step_N).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
