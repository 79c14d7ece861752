"""What every command line of the package shares: one-line errors, `--help`, quiet logs.

`cli.run(main)` replaces `absl.app.run(main)`:

- a user error (any `UserError`: ConfigError, DatasetNotReadyError, CheckpointMismatchError,
  ...; a flag that does not parse or does not exist, e.g. a mistyped `--config.` key; an
  `app.UsageError`; a path that does not exist) prints `error: <message>` to stderr and exits
  with `USER_ERROR_EXIT_CODE` (2) without a traceback. `--verbose` or `STOP_JAX_TRACEBACK=1`
  prints the traceback first. Other exceptions (bugs) keep their traceback and absl's exit.
- `--help` / `--helpshort` / `--helpfull` print the usage to stdout and exit 0 (absl exits 1).
- INFO records of libraries (orbax, jax, absl's own) are hidden; the package's own INFO lines
  and every warning still show. `--verbose` shows everything.

The package's own error classes subclass `UserError` (this module is the lowest layer, so the
higher ones can), and a command adds its own with `run(main, user_errors=(...))`.
"""

from __future__ import annotations

import difflib
import logging as py_logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags, logging

USER_ERROR_EXIT_CODE = 2  # As argparse: the command line or its inputs are wrong.
TRACEBACK_ENV = 'STOP_JAX_TRACEBACK'
_HELP_FLAGS = ('-?', '-h', '--help', '--helpshort', '--helpfull', '--helpxml')
# The package's directory: records logged from files below it are ours.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class UserError(Exception):
  """An error in what the user gave (config, data, paths, checkpoints): the message suffices."""


def _args(argv: Sequence[str]) -> list[str]:
  """The flag part of argv: everything before a bare `--`."""
  args = list(argv[1:])
  return args[: args.index('--')] if '--' in args else args


def verbose_requested(argv: Sequence[str]) -> bool:
  """True for `--verbose` / `--verbose=true` on the command line or STOP_JAX_TRACEBACK=1."""
  if os.environ.get(TRACEBACK_ENV, '').lower() in ('1', 'true', 'yes'):
    return True
  wants = False
  for a in _args(argv):  # the last one wins, as absl parses them
    if a in ('--verbose', '-verbose') or a.lower() in ('--verbose=true', '--verbose=1'):
      wants = True
    elif a in ('--noverbose', '-noverbose') or a.lower() in ('--verbose=false', '--verbose=0'):
      wants = False
  return wants


def help_requested(argv: Sequence[str]) -> bool:
  return any(a.split('=')[0] in _HELP_FLAGS for a in _args(argv))


def is_ours(record: py_logging.LogRecord) -> bool:
  """True for a record logged from a file of this package."""
  return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


def quiet_filter(record: py_logging.LogRecord) -> bool:
  """Keeps warnings and errors from everyone, INFO and DEBUG only from this package."""
  return record.levelno >= py_logging.WARNING or is_ours(record)


def quiet_library_logs() -> None:
  """Hides libraries' INFO records on absl's handler (which the root logger uses)."""
  handler = logging.get_absl_handler()
  if quiet_filter not in handler.filters:
    handler.addFilter(quiet_filter)


def _leaf_paths(config, prefix: str = '') -> list[str]:
  """'a.b.c' paths of every key of a ConfigDict (nested groups walked)."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaf_paths(value, f'{prefix}{key}.')
  return out


def unknown_key_message(flag: str, config, path: str) -> str | None:
  """Why `--flag.path` names no key of `config` (with the closest keys), or None if it does."""
  node, walked = config, []
  for part in path.split('.'):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node, walked = node[part], [*walked, part]
      continue
    group = '.'.join([flag, *walked])
    known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    # The same name in another group (a key documented in the wrong place), or a typo.
    elsewhere = [p for p in _leaf_paths(config) if p.split('.')[-1] == part]
    close = difflib.get_close_matches(part, known, n=3)
    hints = [f'--{flag}.{p}' for p in elsewhere] + [f'--{group}.{k}' for k in close]
    message = f'--{flag}.{path}: {group} has no key {part!r}'
    if hints:
      message += f'; did you mean {" or ".join(dict.fromkeys(hints))}?'
    elif known:
      message += f' (its keys: {", ".join(known)})'
    return message
  return None


def _override_paths(args: Sequence[str]) -> list[tuple[str, str]]:
  """(flag name, dotted path) of every `--flag.a.b[=v]` / `--noflag.a.b` argument."""
  out = []
  for arg in args:
    name = arg.lstrip('-').split('=')[0]
    if not arg.startswith('-') or '.' not in name:
      continue
    flag, path = name.split('.', 1)
    if flag.startswith('no') and flag not in flags.FLAGS:
      flag = flag[2:]
    out.append((flag, path))
  return out


def _loaded_config(flag: str, args: Sequence[str]):
  """The value of config flag `flag`; loaded again from its file when parsing stopped early."""
  if flag not in flags.FLAGS:
    return None
  if flags.FLAGS[flag].value is not None:
    return flags.FLAGS[flag].value
  # An unknown override stops config_flags before the flag holds its config.
  given = [a.split('=', 1)[1] for a in _args(args) if a.startswith((f'--{flag}=', f'-{flag}='))]
  try:
    return flags.FLAGS[flag].parser.parse(given[-1]) if given else None
  except Exception:  # noqa: BLE001 - only a better message is at stake; the caller re-raises
    return None


def _config_errors(args: Sequence[str]) -> str | None:
  """The first unknown config key among the overrides, or a config file that failed to load."""
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    if type(value).__name__ == '_ErrorConfig':  # config_flags defers a failed load to here
      error = object.__getattribute__(value, '_error')
      lines = [line.strip() for line in str(error).splitlines() if line.strip()]
      return f'--{name}={flags.FLAGS[name].serialize().split("=", 1)[-1]}: {lines[-1]}'
  for flag, path in _override_paths(_args(args)):
    value = _loaded_config(flag, args)
    if isinstance(value, ml_collections.ConfigDict):
      message = unknown_key_message(flag, value, path)
      if message:
        return message
  return None


def error_message(error: BaseException, verbose: bool = False) -> str:
  """The error's message; a traceback that config_flags put inside it becomes its last line."""
  message = str(error).strip() or type(error).__name__
  marker = 'Traceback (most recent call last):'
  if marker in message and not verbose:
    head = message.split(marker)[0].strip().removesuffix(':').strip()
    head = head.replace(': Error whilst parsing config file', '')
    last = message.splitlines()[-1].strip()
    # 'package.module.SomeError: text' -> 'text'
    name, _, text = last.partition(': ')
    if text and re.fullmatch(r'[\w.]*(Error|Exception)', name):
      last = text
    message = f'{head}: {last}'
  return message


def fail(error: BaseException, verbose: bool) -> None:
  """Prints `error: <message>` (after the traceback when verbose) and exits with status 2."""
  if verbose:
    traceback.print_exception(error)
  print(f'error: {error_message(error, verbose)}', file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT_CODE)


def run(main: Callable, user_errors: tuple[type[BaseException], ...] = (), argv=None) -> None:
  """Runs `main(argv)` like `absl.app.run`, with this module's errors, help and logging.

  Args:
    main: the command's main; its return value is the exit status (None = 0).
    user_errors: more exception types to report as one-line user errors.
    argv: the command line (default sys.argv).
  """
  argv = list(sys.argv if argv is None else argv)
  if 'verbose' not in flags.FLAGS:
    flags.DEFINE_bool(
      'verbose',
      False,
      f'Show tracebacks of user errors (also {TRACEBACK_ENV}=1) and the INFO logs of libraries.',
      module_name=sys.argv[0],  # listed by --help, with the command's own flags
    )
  verbose = verbose_requested(argv)
  errors = (UserError, app.UsageError, FileNotFoundError, NotADirectoryError, *user_errors)

  def parse(args):
    try:
      rest = flags.FLAGS(args)
    except (flags.Error, *errors) as e:  # a config file may raise ConfigError as it loads
      fail(e, verbose)
    except (AttributeError, KeyError):
      # config_flags reports an override of a key that does not exist as a bare KeyError.
      message = _config_errors(args)
      if message is None:
        raise
      fail(UserError(message), verbose)
    except SystemExit as e:
      # absl's help flags print the usage, then exit 1; asking for help is not a failure.
      if e.code == 1 and help_requested(args):
        sys.exit(0)
      raise
    message = _config_errors(args)
    if message:
      fail(UserError(message), verbose)
    return rest

  def checked_main(args):
    if not verbose:
      quiet_library_logs()
    try:
      return main(args)
    except errors as e:
      fail(e, verbose)

  app.run(checked_main, argv=argv, flags_parser=parse)
