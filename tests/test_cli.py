"""The real command lines: --help exits 0, a user error is one `error:` line with status 2,
and `export` prints its result without the libraries' INFO logs (runtime/cli.py; its own
tests, with a small program instead of these slow imports, are in tests/runtime/test_cli.py)."""

import os
import subprocess
import sys

import pytest

from stop_jax.runtime import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  proc = subprocess.run(
    [sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  return proc.returncode, proc.stdout, proc.stderr


def _last_line(text: str) -> str:
  return text.strip().splitlines()[-1]


@pytest.mark.slow
def test_commands_help_errors_and_quiet_output(tiny_run, tmp_path):
  code, out, _ = _run('stop_jax.main', '--help')
  assert code == 0 and '--workdir' in out and '--[no]verbose' in out

  code, _, err = _run(
    'stop_jax.main',
    '--config=configs/tiny.py',
    f'--workdir={tmp_path / "run"}',
    '--config.checkpoint.on_nonfinite=stop',
  )
  assert code == 2 and 'Traceback' not in err
  assert _last_line(err) == (
    "error: --config.checkpoint.on_nonfinite: config.checkpoint has no key 'on_nonfinite'; "
    'did you mean --config.on_nonfinite?'
  )
  assert not (tmp_path / 'run').exists()  # failed before anything was written

  missing = tmp_path / 'no_such_run'
  code, _, err = _run('stop_jax.evaluate', '--config=configs/eval/tiny.py', f'--workdir={missing}')
  assert code == 2 and 'Traceback' not in err
  assert _last_line(err) == f'error: --workdir={missing} does not exist.'

  output = str(tmp_path / 'export')
  code, out, err = _run('stop_jax.eval.export', f'--workdir={tiny_run}', f'--output={output}')
  assert (code, out) == (0, f'{output}\n')
  assert 'orbax' not in err and 'checkpoint_manager' not in err
