"""runtime/cli.py: one-line user errors, --help exiting 0, libraries' INFO hidden.

The pure parts here; a small program run through `cli.run` checks exit codes and output (fast:
no JAX); tests/test_cli.py runs the real commands.
"""

import logging
import os
import subprocess
import sys

import pytest
from absl import flags

from stop_jax import config as config_lib
from stop_jax.runtime import cli

REPO = os.path.join(os.path.dirname(__file__), '..', '..')

PROGRAM = """
import logging
from absl import flags
from ml_collections import config_flags
from stop_jax import config as config_lib
from stop_jax.runtime import cli

config_flags.DEFINE_config_file('config', None, 'A config file.')
flags.DEFINE_string('fail', '', 'What to raise: config, bug or nothing.')


def main(argv):
  logging.getLogger('orbax').info('orbax chatter')  # logged from a file outside the package
  if flags.FLAGS.fail == 'config':
    raise config_lib.ConfigError('config.stop.sigma=-1.0 is not allowed: >= 0.')
  if flags.FLAGS.fail == 'bug':
    raise ZeroDivisionError('a bug')
  print('result line')


cli.run(main)
"""


def test_user_errors_are_the_package_errors():
  from stop_jax.data import sources
  from stop_jax.runtime import checkpointing, sharding

  for error in (
    config_lib.ConfigError,
    sources.DatasetNotReadyError,
    checkpointing.CheckpointMismatchError,
    checkpointing.NoUsableCheckpointError,
    sharding.MeshError,
  ):
    assert issubclass(error, cli.UserError), error


def test_unknown_key_names_the_group_and_the_key_elsewhere():
  config = config_lib.base_config()
  assert cli.unknown_key_message('config', config, 'checkpoint.on_nonfinite') == (
    "--config.checkpoint.on_nonfinite: config.checkpoint has no key 'on_nonfinite'; "
    'did you mean --config.on_nonfinite?'
  )
  assert 'did you mean --config.stop.sigma?' in cli.unknown_key_message(
    'config', config, 'stop.sigm'
  )
  assert cli.unknown_key_message('config', config, 'stop.sigma') is None


def test_error_message_keeps_the_last_line_of_a_traceback_inside_it():
  error = flags.IllegalFlagValueError(
    'flag --config=configs/ablation.py:variant=x: Error whilst parsing config file:\n\n'
    'Traceback (most recent call last):\n  File "configs/ablation.py", line 66\n'
    "stop_jax.config.checks.ConfigError: ablation variant='x' is not allowed."
  )
  assert cli.error_message(error) == (
    "flag --config=configs/ablation.py:variant=x: ablation variant='x' is not allowed."
  )
  assert 'Traceback' in cli.error_message(error, verbose=True)


def test_flag_scans_and_the_log_filter(monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  assert cli.verbose_requested(['p', '--verbose']) and not cli.verbose_requested(['p'])
  assert not cli.verbose_requested(['p', '--verbose', '--noverbose'])
  assert not cli.verbose_requested(['p', '--', '--verbose'])  # after --: not a flag
  assert cli.help_requested(['p', '--helpfull']) and not cli.help_requested(['p', '--helpme'])
  monkeypatch.setenv(cli.TRACEBACK_ENV, '1')
  assert cli.verbose_requested(['p'])

  def record(path, level):
    return logging.LogRecord('x', level, path, 1, 'm', None, None)

  ours = os.path.join(os.path.dirname(cli.__file__), '..', 'train', 'loop.py')
  assert cli.quiet_filter(record(ours, logging.INFO))
  assert not cli.quiet_filter(record('/site-packages/orbax/checkpoint/x.py', logging.INFO))
  assert cli.quiet_filter(record('/site-packages/orbax/checkpoint/x.py', logging.WARNING))


@pytest.fixture(scope='module')
def program(tmp_path_factory):
  path = tmp_path_factory.mktemp('cli') / 'program.py'
  path.write_text(PROGRAM)

  def run(*args, env=None):
    environ = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    proc = subprocess.run(
      [sys.executable, str(path), *args],
      cwd=REPO,
      env={**environ, **(env or {})},
      capture_output=True,
      text=True,
      timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr

  return run


def test_a_user_error_is_one_line_and_status_2(program):
  code, out, err = program('--config=configs/tiny.py', '--fail=config')
  assert code == 2 and out == ''
  assert err == 'error: config.stop.sigma=-1.0 is not allowed: >= 0.\n'
  code, _, err = program('--config=configs/tiny.py', '--fail=config', env={cli.TRACEBACK_ENV: '1'})
  assert (
    code == 2
    and 'Traceback' in err
    and err.endswith('error: config.stop.sigma=-1.0 is not allowed: >= 0.\n')
  )
  code, _, err = program('--config=configs/tiny.py', '--config.checkpoint.on_nonfinite=stop')
  assert code == 2 and err.startswith('error: ') and err.count('\n') == 1
  assert 'did you mean --config.on_nonfinite?' in err
  code, _, err = program('--config=configs/tiny.py', '--no_such_flag=1')
  assert (code, err) == (2, "error: Unknown command line flag 'no_such_flag'\n")
  code, _, err = program('--config=configs/missing.py')
  assert code == 2 and err.startswith('error: --config=configs/missing.py: ')
  assert 'No such file' in err and err.count('\n') == 1


def test_a_bug_keeps_its_traceback(program):
  code, _, err = program('--config=configs/tiny.py', '--fail=bug')
  assert code == 1 and 'Traceback' in err and 'ZeroDivisionError: a bug' in err


def test_help_exits_0_and_libraries_info_is_hidden_unless_verbose(program):
  code, out, _ = program('--help')
  assert code == 0 and '--fail' in out and '--[no]verbose' in out
  code, out, err = program('--config=configs/tiny.py')
  assert (code, out) == (0, 'result line\n') and 'orbax chatter' not in err
  code, out, err = program('--config=configs/tiny.py', '--verbose')
  assert code == 0 and 'orbax chatter' in err
