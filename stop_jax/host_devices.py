"""Simulated CPU devices for tools that compile for a mesh this machine does not have.

Imports nothing heavy on purpose: it must run before JAX creates its backends, which is when
XLA reads XLA_FLAGS.
"""

import os


def simulate_from_argv(argv: list[str], default: int) -> int:
  """Asks XLA for `--num_devices=N` (from argv, else `default`) CPU devices; returns N.

  Keeps a device count already set in XLA_FLAGS, and defaults JAX to the CPU platform.
  """
  n = default
  for a in argv:
    if a.startswith('--num_devices='):
      n = int(a.split('=', 1)[1])
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  return n
