"""README.md's "Config reference" names only keys that exist, each in its group, and every group.

A group's bullet starts with the group (`- `data`: ...`); its keys are the backticked names
outside parentheses (inside them are values and notes). A bullet that starts with a top-level key
(`- Top level: `on_nonfinite` ...`, `- `xla_cpu_matmul` ...`) names top-level keys.
"""

import os
import re

import ml_collections

from stop_jax import config as config_lib

README = os.path.join(os.path.dirname(__file__), '..', '..', 'README.md')
_NAME = re.compile(r'[a-z][a-z0-9_]*(/[a-z][a-z0-9_]*)*')


def reference_section(text: str) -> str:
  start = text.index('## Config reference')
  return text[start : text.index('\n#', start + 1)]


def bullets(section: str) -> list[str]:
  """The '- ' items of the section, each joined onto one line."""
  items = re.split(r'\n- ', section.split('\n- ', 1)[1])
  return [' '.join(line.strip() for line in item.split('\n\n')[0].splitlines()) for item in items]


def outside_parentheses(text: str) -> str:
  depth, out = 0, []
  for ch in text:
    depth += ch == '('
    if depth == 0:
      out.append(ch)
    depth -= ch == ')' and depth > 0
  return ''.join(out)


def named_keys(bullet: str) -> list[str]:
  """Key names of a bullet (a `a/b` token names a and b); values inside (...) are left out."""
  names = []
  for token in re.findall(r'`([^`]+)`', outside_parentheses(bullet)):
    if _NAME.fullmatch(token):
      names += token.split('/')
  return names


def check_reference(text: str, config: ml_collections.ConfigDict) -> list[str]:
  """What is wrong with the reference: keys that do not exist where named, groups not named."""
  problems, groups_named = [], set()
  for bullet in bullets(reference_section(text)):
    names = named_keys(bullet)
    if not names:
      continue
    head = names[0]
    if isinstance(config.get(head), ml_collections.ConfigDict):
      groups_named.add(head)
      scope, prefix, names = config[head], f'{head}.', names[1:]
    else:
      scope, prefix = config, ''
    problems += [f'config.{prefix}{n}' for n in names if n not in scope]
  groups = {k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)}
  problems += [f'group {g} not named' for g in sorted(groups - groups_named)]
  return problems


def test_every_key_named_exists_and_every_group_is_named():
  with open(README) as f:
    assert check_reference(f.read(), config_lib.base_config()) == []


def test_check_finds_a_top_level_key_listed_under_a_group():
  # The README's old line: on_nonfinite is top-level, so --config.checkpoint.on_nonfinite fails.
  old = (
    '## Config reference\n\n- `checkpoint`: `every_steps`, `keep`;\n'
    '  `on_nonfinite` (`stop`/`skip`) and `max_consecutive_skips`.\n- `seed`.\n\n## Next\n'
  )
  config = ml_collections.ConfigDict(
    {
      'checkpoint': {'every_steps': 1, 'keep': 1},
      'mesh': {'data': 1},
      'seed': 0,
      'on_nonfinite': 'stop',
      'max_consecutive_skips': 1,
    }
  )
  assert check_reference(old, config) == [
    'config.checkpoint.on_nonfinite',
    'config.checkpoint.max_consecutive_skips',
    'group mesh not named',
  ]
