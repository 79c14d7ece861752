"""Process set-up before JAX starts: simulated CPU devices for tools that compile for a mesh
this machine does not have, and the huge-page malloc restart for fast XLA:CPU steps.

Imports nothing heavy on purpose: it must run before JAX creates its backends, which is when
XLA reads XLA_FLAGS (and the restart would repeat any import done before it).
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


# glibc's malloc, asked to back its large mmap'd blocks with transparent huge pages (glibc >= 2.35).
_HUGEPAGE_TUNABLE = 'glibc.malloc.hugetlb=1'
# Set to 0 to keep the process as started (also set by the restart itself, so it runs once).
HUGEPAGE_ENV = 'STOP_JAX_HUGEPAGE_MALLOC'


def _thp_mode() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().split('[', 1)[1].split(']', 1)[0]
  except (OSError, IndexError):
    return 'never'


def restart_with_hugepage_malloc() -> None:
  """Re-executes this process once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, if that helps.

  Why: XLA:CPU mallocs each step's temporaries afresh (1.6 GB for the ViT-Ti/16 reference step)
  and glibc maps such blocks anew every time, so the kernel faults them in 4 KiB pages: measured
  400k page faults and ~0.8 s of system time per 3-4 s step. With huge pages it is ~2k faults and
  the step ~20% faster (bench/README.md). glibc reads tunables only at start-up, hence the
  restart (same PID, argv and environment otherwise). Call it first thing in a `__main__`, before
  anything heavy is imported. A no-op off Linux/glibc, when transparent huge pages are off,
  when already set, or when STOP_JAX_HUGEPAGE_MALLOC=0.
  """
  import platform
  import sys

  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if (
    os.environ.get(HUGEPAGE_ENV) == '0'
    or 'glibc.malloc.hugetlb' in tunables
    or not sys.platform.startswith('linux')
    or platform.libc_ver()[0] != 'glibc'
    or _thp_mode() == 'never'
  ):
    return
  env = dict(os.environ, **{HUGEPAGE_ENV: '0'})
  env['GLIBC_TUNABLES'] = f'{tunables}:{_HUGEPAGE_TUNABLE}' if tunables else _HUGEPAGE_TUNABLE
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
