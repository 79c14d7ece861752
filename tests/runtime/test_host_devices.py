"""Process set-up that must happen before JAX starts: simulated devices, huge-page malloc."""

import os
import subprocess
import sys

import pytest

from stop_jax.runtime import host_devices


def test_simulated_device_count_comes_from_argv_and_keeps_an_existing_setting(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/x')
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  assert host_devices.simulate_from_argv(['prog', '--num_devices=64'], default=8) == 64
  assert os.environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=64'
  assert os.environ['JAX_PLATFORMS'] == 'cpu'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  host_devices.simulate_from_argv(['prog'], default=8)
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'


@pytest.fixture
def fake_exec(monkeypatch):
  calls = []
  monkeypatch.setattr(os, 'execve', lambda path, argv, env: calls.append((path, argv, env)))
  monkeypatch.setattr(host_devices, '_thp_mode', lambda: 'madvise')
  monkeypatch.setattr(host_devices, '_has_accelerator', lambda: False)
  monkeypatch.delenv(host_devices.HUGEPAGE_ENV, raising=False)
  return calls


def test_hugepage_restart_keeps_argv_and_other_tunables(fake_exec, monkeypatch):
  if not sys.platform.startswith('linux'):
    pytest.skip('glibc only')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1024')
  monkeypatch.setattr(sys, 'orig_argv', ['python3', '-m', 'stop_jax.main', '--workdir=w'])
  host_devices.restart_with_hugepage_malloc()
  [(path, argv, env)] = fake_exec
  assert path == sys.executable and argv == [sys.executable, '-m', 'stop_jax.main', '--workdir=w']
  assert env['GLIBC_TUNABLES'] == (
    'glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1024:glibc.malloc.hugetlb=1:'
    'glibc.malloc.mmap_max=0'
  )  # ours appended; the caller's arena_max and trim_threshold kept, not overridden
  assert env[host_devices.HUGEPAGE_ENV] == '0'  # the restarted process does not restart again


@pytest.mark.parametrize(
  'setting', ['opted_out', 'already_set', 'no_transparent_huge_pages', 'gpu_or_tpu_host'], ids=str
)
def test_hugepage_restart_is_skipped(fake_exec, monkeypatch, setting):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  if setting == 'gpu_or_tpu_host':
    monkeypatch.setattr(host_devices, '_has_accelerator', lambda: True)
  elif setting == 'opted_out':
    monkeypatch.setenv(host_devices.HUGEPAGE_ENV, '0')
  elif setting == 'already_set':
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=2')
  else:
    monkeypatch.setattr(host_devices, '_thp_mode', lambda: 'never')
  host_devices.restart_with_hugepage_malloc()
  assert fake_exec == []


def test_hugepage_restart_on_an_accelerator_host_when_jax_is_told_to_use_the_cpu(
  fake_exec, monkeypatch
):
  if not sys.platform.startswith('linux'):
    pytest.skip('glibc only')
  monkeypatch.setattr(host_devices, '_has_accelerator', lambda: True)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  host_devices.restart_with_hugepage_malloc()
  [(_, _, env)] = fake_exec
  assert env['GLIBC_TUNABLES'].startswith('glibc.malloc.hugetlb=1:')


def test_hugepage_restart_for_real_runs_the_program_again_once():
  if (
    not sys.platform.startswith('linux')
    or host_devices._thp_mode() == 'never'
    or host_devices._has_accelerator()
  ):
    pytest.skip('needs Linux with transparent huge pages and no GPU/TPU')
  code = (
    'import os; from stop_jax.runtime import host_devices; '
    "print(os.environ.get('GLIBC_TUNABLES', '-'), flush=True); "
    'host_devices.restart_with_hugepage_malloc()'
  )
  env = {
    k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'STOP_JAX_HUGEPAGE_MALLOC')
  }
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [
    '-',
    'glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:'
    f'glibc.malloc.trim_threshold={16 << 30}',
  ]
