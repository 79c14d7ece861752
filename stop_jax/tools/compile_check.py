"""Will this config fit? Compile the real train step for N devices on this CPU and report memory.

    python -m stop_jax.tools.compile_check --config=configs/vith14.py --num_devices=64 \\
        --config.mesh.data=-1 --config.mesh.fsdp=8 --device=h100

simulates `--num_devices` CPU devices (XLA's host-platform device count), builds the mesh of the
config on them, lowers and compiles the exact step that training runs (same shardings, same
batch shapes, state created abstractly so nothing is allocated), and prints parameter counts,
per-device bytes of params / optimiser state / EMA target, XLA's memory analysis of the
compiled step, and whether it fits the chosen device's memory. Nothing touches an accelerator.

The CPU compiler fuses and lays out buffers differently from the TPU / GPU compilers, so the
compiled temporaries are an estimate (usually pessimistic: XLA:CPU keeps more intermediates and
does not run the accelerator's rematerialisation pass); the state bytes are exact.
"""

# The device count must be fixed before JAX initialises its backends, i.e. before `import jax`.
import sys

from stop_jax.runtime import host_devices

if __name__ == '__main__':
  host_devices.simulate_from_argv(sys.argv, default=8)

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from stop_jax import config as config_lib  # noqa: E402
from stop_jax.data import masking  # noqa: E402
from stop_jax.runtime import cli, fileio, sharding  # noqa: E402
from stop_jax.train import setup  # noqa: E402
from stop_jax.train.schedules import Schedules  # noqa: E402

# Memory per accelerator (GiB) of common targets; --device_memory_gib overrides.
DEVICE_MEMORY_GIB = {
  'h100': 80.0,
  'h200': 141.0,
  'a100-40g': 40.0,
  'a100-80g': 80.0,
  'v4': 32.0,
  'v5e': 16.0,
  'v5p': 95.0,
  'v6e': 32.0,
}
GIB = 2.0**30


def check(config, num_devices: int | None = None, device_memory_gib: float | None = None) -> dict:
  """Compiles the train step of `config` on the current (possibly simulated) devices.

  Returns:
    A dict with the mesh, param counts, per-device state bytes, XLA's compiled memory
    analysis, compile seconds and (if device_memory_gib) whether the estimate fits.
  """
  devices = jax.devices()
  if num_devices is not None and len(devices) != num_devices:
    raise ValueError(
      f'{num_devices} devices asked for but JAX sees {len(devices)}: run as '
      '`python -m stop_jax.tools.compile_check` (which sets XLA_FLAGS before JAX starts).'
    )
  config_lib.validate(config, num_devices=len(devices))
  mask_spec = masking.spec_from_config(config)
  mesh = sharding.make_mesh(config, devices)
  t0 = time.perf_counter()
  # The schedules' constants do not change the compiled program's shapes: any epoch length does.
  schedules = Schedules.from_config(config, steps_per_epoch=1000)
  sharded = setup.make_sharded_step(config, mesh, schedules)
  compiled = sharded.compile(config, mask_spec)
  seconds = time.perf_counter() - t0
  info = setup.describe_memory(sharded, compiled)
  info['compile_seconds'] = seconds
  info['global_batch_size'] = config.data.global_batch_size
  info['num_devices'] = len(devices)
  state = sum(info['bytes_per_device'].values())
  info['state_bytes_per_device'] = state
  peak = info.get('compiled', {}).get('peak_estimate_bytes', state)
  if device_memory_gib:
    info['device_memory_gib'] = device_memory_gib
    info['fits'] = peak <= device_memory_gib * GIB
  return info


def format_report(info: dict) -> str:
  b = info['bytes_per_device']
  lines = [
    f'mesh {info["mesh"]} ({info["num_devices"]} devices), global batch '
    f'{info["global_batch_size"]}',
    f'params: encoder {info["encoder_params"] / 1e6:.1f}M, predictor '
    f'{info["predictor_params"] / 1e6:.1f}M',
    f'per device: params {b["params"] / GIB:.3f} GiB, optimiser {b["opt_state"] / GIB:.3f} GiB, '
    f'EMA target {b["ema_target"] / GIB:.3f} GiB',
  ]
  c = info.get('compiled')
  if c:
    lines.append(
      f'compiled step per device: arguments {c.get("argument_size_in_bytes", 0) / GIB:.2f} GiB, '
      f'temporaries {c.get("temp_size_in_bytes", 0) / GIB:.2f} GiB, peak estimate '
      f'{c["peak_estimate_bytes"] / GIB:.2f} GiB'
    )
  lines.append(f'compile time {info["compile_seconds"]:.1f}s (XLA:CPU)')
  if 'fits' in info:
    verdict = 'FITS' if info['fits'] else 'DOES NOT FIT'
    lines.append(f'{verdict} in {info["device_memory_gib"]:.0f} GiB per device')
  return '\n'.join(lines)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py[:arg]).')
  flags.DEFINE_integer('num_devices', 8, 'Devices to simulate (the size of the target mesh).')
  flags.DEFINE_enum(
    'device', None, sorted(DEVICE_MEMORY_GIB), 'Target accelerator, for the fits/does-not-fit line.'
  )
  flags.DEFINE_float('device_memory_gib', None, 'Memory per device (overrides --device).')
  flags.DEFINE_string('output', None, 'Also write the report as JSON to this file.')
  flags.mark_flags_as_required(['config'])
  FLAGS = flags.FLAGS

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    memory = FLAGS.device_memory_gib or (DEVICE_MEMORY_GIB[FLAGS.device] if FLAGS.device else None)
    try:
      info = check(FLAGS.config, FLAGS.num_devices, memory)
    except (config_lib.ConfigError, sharding.MeshError) as e:
      raise app.UsageError(str(e)) from e
    logging.info('compile check done')
    print(format_report(info))
    print('RESULT ' + json.dumps(info, default=float))
    if FLAGS.output:
      fileio.write_json(FLAGS.output, info, indent=2, default=float)  # local or gs://

  cli.run(main)
