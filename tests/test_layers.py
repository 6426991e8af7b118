"""The layering rules the code keeps: a method module imports no other method (shared stages are
jaxopd/stages.py, a task's data and evaluation jaxopd/tasks/), and the model modules import
nothing from the data layer."""

import ast
import glob
import os

from helpers import REPO


def _imports(path: str) -> set[str]:
  """Every module ``path`` imports (``from a import b`` gives ``a`` and ``a.b``), at any depth."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def test_methods_import_no_other_method():
  for path in glob.glob(os.path.join(REPO, "jaxopd", "methods", "*.py")):
    name = os.path.basename(path)[:-3]
    if name == "__init__":
      continue
    other = {m for m in _imports(path) if m.startswith("jaxopd.methods") and m != f"jaxopd.methods.{name}"}
    assert not other, f"jaxopd/methods/{name}.py imports {sorted(other)}"


def test_models_import_nothing_from_data():
  for path in glob.glob(os.path.join(REPO, "jaxopd", "models", "*.py")):
    up = {m for m in _imports(path) if m.startswith(("jaxopd.data", "jaxopd.methods", "jaxopd.tasks"))}
    assert not up, f"{os.path.relpath(path, REPO)} imports {sorted(up)}"


def _module_imports(path: str, modules: set[str]) -> set[str]:
  """The jaxopd modules ``path`` imports at module level (``from pkg import sub`` of a submodule
  is an import of ``pkg.sub`` alone)."""
  out = set()
  for node in ast.parse(open(path).read()).body:
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      subs = {f"{node.module}.{a.name}" for a in node.names} & modules
      out.update(subs)
      if len(subs) < len(node.names):
        out.add(node.module)
  return out & modules


def test_no_import_circle():
  """No module of jaxopd imports (at module level) one that imports it back, directly or not."""
  paths = {}
  for path in glob.glob(os.path.join(REPO, "jaxopd", "**", "*.py"), recursive=True):
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    paths[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  graph = {m: _module_imports(p, set(paths)) - {m} for m, p in paths.items()}
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for n in sorted(graph[m]):
      assert state.get(n) != "open", "import circle: " + " -> ".join(stack[stack.index(n):] + [m, n])
      if n not in state:
        visit(n, stack + [m])
    state[m] = "done"
  for m in sorted(graph):
    if m not in state:
      visit(m, [])
