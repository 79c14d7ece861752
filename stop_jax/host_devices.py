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
#   mmap_max=0         serve every block from the heap instead of a fresh mmap per block;
#   trim_threshold=16G keep freed heap memory for the next step instead of returning it.
# glibc always mmaps blocks above its mmap threshold (32 MiB at most) and unmaps them on free:
# without the last two, every step mapped and faulted its largest blocks anew.
_MALLOC_TUNABLES = (
  ('glibc.malloc.hugetlb', '1'),
  ('glibc.malloc.mmap_max', '0'),
  ('glibc.malloc.trim_threshold', str(16 << 30)),
)
# Set to 0 to keep the process as started (also set by the restart itself, so it runs once).
HUGEPAGE_ENV = 'STOP_JAX_HUGEPAGE_MALLOC'


def _thp_mode() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().split('[', 1)[1].split(']', 1)[0]
  except (OSError, IndexError):
    return 'never'


def restart_with_hugepage_malloc() -> None:
  """Re-executes this process once with `_MALLOC_TUNABLES` in GLIBC_TUNABLES, if that helps.

  Why: XLA:CPU mallocs each step's temporaries afresh (1.4-1.6 GB for the ViT-Ti/16 reference
  step) and glibc maps such blocks anew every time, so the kernel faults them in 4 KiB pages:
  measured 400k page faults and ~0.8 s of system time per 3-4 s step. With huge pages alone it
  was 3-15k faults and 0.5-1.6 s of system time per step (large blocks were still mapped and
  unmapped every step); with the heap kept as well, ~1.1k faults and 0.25-0.4 s, and the step
  ~15% faster (bench/README.md). The cost: freed memory stays with the process (RSS = peak). glibc reads tunables only at start-up, hence the
  restart (same PID, argv and environment otherwise). Call it first thing in a `__main__`,
  before anything heavy is imported. A no-op off Linux/glibc, when transparent huge pages are
  off, when GLIBC_TUNABLES already sets glibc.malloc.hugetlb, or when
  STOP_JAX_HUGEPAGE_MALLOC=0. Other tunables already set are kept, and win over ours.
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
  ours = [f'{k}={v}' for k, v in _MALLOC_TUNABLES if f'{k}=' not in tunables]
  env = dict(os.environ, **{HUGEPAGE_ENV: '0'})
  env['GLIBC_TUNABLES'] = ':'.join([tunables, *ours] if tunables else ours)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
