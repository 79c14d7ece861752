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


# glibc malloc settings for XLA:CPU's per-step temporaries (glibc >= 2.35 for hugetlb):
#   hugetlb=1          back large blocks with transparent huge pages (2 MiB faults, not 4 KiB);
#   mmap_max=0         serve every block from the heap, not from a fresh mmap per block (glibc
#                      always mmaps blocks above its threshold, 32 MiB at most);
#   arena_max=1        one heap for all threads: XLA's threads otherwise malloc from per-thread
#                      arenas of 64 MiB heaps, which glibc unmaps whenever they empty;
#   trim_threshold=16G keep freed heap memory for the next step instead of returning it.
# Measured on the ViT-Ti/16 step: with all four, no page faults at all after the first steps.
_MALLOC_TUNABLES = (
  ('glibc.malloc.hugetlb', '1'),
  ('glibc.malloc.mmap_max', '0'),
  ('glibc.malloc.arena_max', '1'),
  ('glibc.malloc.trim_threshold', str(16 << 30)),
)
# Device nodes of GPUs and TPUs: there the step is not XLA:CPU's, and one malloc arena could slow
# a many-threaded input pipeline, so the restart is skipped (unless JAX_PLATFORMS=cpu).
_ACCELERATOR_NODES = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')
# Set to 0 to keep the process as started (also set by the restart itself, so it runs once).
HUGEPAGE_ENV = 'STOP_JAX_HUGEPAGE_MALLOC'


def _thp_mode() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().split('[', 1)[1].split(']', 1)[0]
  except (OSError, IndexError):
    return 'never'


def _has_accelerator() -> bool:
  import glob

  return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def restart_with_hugepage_malloc() -> None:
  """Re-executes this process once with `_MALLOC_TUNABLES` in GLIBC_TUNABLES, if that helps.

  Why: XLA:CPU mallocs each step's temporaries afresh and glibc hands such memory back to the
  kernel when it is freed, so every step faulted it in again, a page at a time; with huge pages
  and a kept heap the faults and most of the system time go away (measured: bench/NOTES.md,
  2026-12-01). The cost: freed memory stays with the process (RSS = peak), and
  all threads share one malloc arena. glibc reads tunables only at start-up, hence the restart
  (same PID, argv and environment otherwise). Call it first thing in a `__main__`, before
  anything heavy is imported. A no-op off Linux/glibc, when transparent huge pages are off, on
  a GPU/TPU host (unless JAX_PLATFORMS=cpu), when GLIBC_TUNABLES already sets
  glibc.malloc.hugetlb, or when STOP_JAX_HUGEPAGE_MALLOC=0. Other tunables already set are kept,
  and win over ours.
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
    or (os.environ.get('JAX_PLATFORMS') != 'cpu' and _has_accelerator())
  ):
    return
  ours = [f'{k}={v}' for k, v in _MALLOC_TUNABLES if f'{k}=' not in tunables]
  env = dict(os.environ, **{HUGEPAGE_ENV: '0'})
  env['GLIBC_TUNABLES'] = ':'.join([tunables, *ours] if tunables else ours)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
