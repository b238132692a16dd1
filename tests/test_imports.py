"""The import graph of jdiff/: no cycle, and no import that runs up a layer.

Every `import` and `from ... import` of every module (function-local ones included) is read
with `ast`; `from pkg import name` counts as an import of `pkg.name` when that is a module.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jdiff")

# Lowest first. A module may import its own layer and the layers below, never one above.
# A module's layer is that of the longest entry that is a prefix of its name.
LAYERS = (
  ("jdiff.io", "jdiff.audio_io", "jdiff.ops"),  # leaves
  (
    "jdiff.schedules",
    "jdiff.diffusion",
    "jdiff.processes",
    "jdiff.continuous",
    "jdiff.losses",
    "jdiff.likelihood",
    "jdiff.conditioning",
    # model_fn -> model_fn wrappers: pure functions of the library's one interface
    "jdiff.models.guidance",
    "jdiff.models.guidance_schedules",
  ),  # the pure maths
  ("jdiff.samplers", "jdiff.flow", "jdiff.distill"),
  # The registry binds a Flax module's parameters to the samplers (`make_sample_fn`).
  ("jdiff.models", "jdiff.metrics", "jdiff.samplers.registry"),
  ("jdiff.pretrained", "jdiff.data"),
  ("jdiff.training",),  # the config-free toolkit
  ("jdiff.runs", "jdiff.configs"),  # config -> run
  ("jdiff.cli", "jdiff.__main__", "jdiff"),  # entry points and the re-exporting package
)
# Within runs/: the leaf that every mode samples through imports no mode.
MODES = (
  "jdiff.runs.diffusion",
  "jdiff.runs.fid",
  "jdiff.runs.edit",
  "jdiff.runs.reflow",
  "jdiff.runs.text2image",
  "jdiff.runs.distill",
)


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


def _is_type_checking(node) -> bool:
  return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _runtime_nodes(tree):
  """Every node of `tree` but those under `if TYPE_CHECKING:` (annotations, never run)."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    stack.extend(c for c in ast.iter_child_nodes(node) if not _is_type_checking(c))


def import_graph() -> dict[str, set[str]]:
  """module -> the jdiff modules it imports (module-level and function-local)."""
  mods = _modules()

  def resolve(name):
    while name not in mods and "." in name:
      name = name.rsplit(".", 1)[0]
    return name

  graph = {}
  for mod, path in mods.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    names = set()
    for node in _runtime_nodes(tree):
      if isinstance(node, ast.Import):
        names |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[: len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        names |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
    graph[mod] = {resolve(n) for n in names if n.split(".")[0] == "jdiff"} - {mod}
  return graph


def layer_of(mod: str) -> int:
  best, layer = "", None
  for i, names in enumerate(LAYERS):
    for name in names:
      if (mod == name or mod.startswith(name + ".")) and len(name) > len(best):
        best, layer = name, i
  if layer is None:
    raise AssertionError(f"{mod} is in no layer: add it to LAYERS")
  return layer


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycle():
  assert cycles(import_graph()) == []


def test_no_import_runs_up_a_layer():
  up = [
    f"{m} -> {t}"
    for m, targets in sorted(import_graph().items())
    for t in sorted(targets)
    if layer_of(t) > layer_of(m)
  ]
  assert up == []


def test_generate_imports_no_mode():
  assert not import_graph()["jdiff.runs.generate"] & set(MODES)


@pytest.mark.parametrize(
  "graph, expected",
  [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
  ],
)
def test_cycle_finder(graph, expected):
  assert cycles(graph) == expected


def test_layer_of_takes_the_longest_prefix():
  assert layer_of("jdiff.runs.setup") == 6
  assert layer_of("jdiff.diffusion") == 1
  assert layer_of("jdiff") == 7
