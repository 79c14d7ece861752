"""Shared fixtures.

`tiny_run`: one short real pretraining run of configs/tiny.py, made once per test session and
reused by every test that only needs *a* trained run directory (eval, export, analysis,
notebooks), instead of each training its own. Under pytest-xdist the first worker trains it
and the others wait on a file lock and reuse it.
"""

import fcntl
import os

import pytest

from tests.subprocess_env import TEST_XLA_FLAGS

# Before JAX starts in this process (test modules import it later); children inherit it.
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {TEST_XLA_FLAGS}'.strip()

TINY_RUN_STEPS = 30


def session_dir(tmp_path_factory):
  """A directory shared by every xdist worker of this pytest session."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def shared_once(tmp_path_factory, name: str, make) -> str:
  """`make(path)` once per session for all workers; returns the path (a directory)."""
  root = session_dir(tmp_path_factory)
  path = root / name
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker makes it, the others wait and reuse it
    if not (root / f'{name}.done').exists():
      make(str(path))
      (root / f'{name}.done').touch()
  return str(path)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> str:
  """configs/tiny.py trained for TINY_RUN_STEPS steps (probe off, final checkpoint): a run dir.

  Read-only for the tests: copy it before changing anything in it.
  """
  from stop_jax.tools.analysis import runs

  return shared_once(
    tmp_path_factory, 'tiny_run', lambda d: runs.ensure_tiny_run(d, steps=TINY_RUN_STEPS)
  )
