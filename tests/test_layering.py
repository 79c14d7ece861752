"""The package's layering: a folder never imports from a layer above it, and no import cycles.

Layers, lowest first (README, "Layout"):
  runtime < config < models, data < eval < train < tools < entry points (main, evaluate, finetune)
Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'stop_jax'

LAYERS = {
  'runtime': 0,
  'config': 1,
  'models': 2,
  'data': 2,
  'eval': 3,
  'train': 4,
  'tools': 5,
  'main': 6,
  'evaluate': 6,
  'finetune': 6,
  'figures': 6,
  'sweep': 6,
  '__init__': 6,
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  if parts[-1] == '__init__' and len(parts) > 1:
    parts = parts[:-1]
  return '.'.join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _resolve(name: str, modules) -> str | None:
  """The longest prefix of a dotted name that is one of our modules."""
  parts = name.split('.')
  for n in range(len(parts), 0, -1):
    candidate = '.'.join(parts[:n])
    if candidate in modules:
      return candidate
  return None


def _imports(path: pathlib.Path, modules) -> set[str]:
  """Our modules that the file imports, at any depth of the file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from stop_jax.eval import knn` imports stop_jax.eval.knn; `from x import Name`, x.
      names = [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    for name in names:
      if name.split('.')[0] != 'stop_jax':
        continue
      found = _resolve(name, modules)
      if found:
        out.add(found)
  return out


def _layer(module: str) -> tuple[str, int]:
  parts = module.split('.')
  folder = parts[1] if len(parts) > 1 else '__init__'
  if folder not in LAYERS:
    raise AssertionError(f'{module}: folder {folder!r} has no layer in LAYERS; add it there.')
  return folder, LAYERS[folder]


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_no_module_imports_from_a_layer_above_or_a_sibling_folder():
  bad = []
  for module, deps in _graph().items():
    folder, layer = _layer(module)
    for dep in deps:
      dep_folder, dep_layer = _layer(dep)
      if dep_folder == folder or dep_folder == '__init__' and dep == 'stop_jax':
        continue
      if dep_layer >= layer:
        bad.append(
          f'{module} ({folder}, layer {layer}) imports {dep} ({dep_folder}, layer {dep_layer})'
        )
  assert not bad, 'layering violations:\n  ' + '\n  '.join(sorted(bad))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done
  path: list[str] = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        return path[path.index(d) :] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    path.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycles():
  graph = _graph()
  # A package's __init__ importing its own submodules is not a cycle of the code.
  for m in graph:
    graph[m] = {d for d in graph[m] if not (m.startswith(d + '.') and d != 'stop_jax')}
  cycle = _cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_checker_sees_violations_and_cycles():
  # The checks above must be able to fail: a fake graph with an upward import and a cycle.
  assert _layer('stop_jax.runtime.sharding') == ('runtime', 0)
  assert _layer('stop_jax.train.loop')[1] > _layer('stop_jax.eval.knn')[1]
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None
  with pytest.raises(AssertionError, match='no layer'):
    _layer('stop_jax.newfolder.x')


def test_no_module_is_too_long():
  # ~450 lines: a module a newcomer reads in one sitting.
  long = {
    _module_name(p): n
    for p in PACKAGE.rglob('*.py')
    if (n := len(p.read_text().splitlines())) > 450
  }
  assert not long, f'modules over 450 lines: {long}'


def test_no_function_is_too_long():
  # ~80 lines, docstring included: a function that fits on a screen or two.
  long = {}
  for p in PACKAGE.rglob('*.py'):
    for node in ast.walk(ast.parse(p.read_text(), str(p))):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        n = node.end_lineno - node.lineno + 1
        if n > 80:
          long[f'{_module_name(p)}.{node.name}'] = n
  assert not long, f'functions over 80 lines: {long}'
