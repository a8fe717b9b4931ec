"""The package's shape, checked: no import cycle, imports only point down the layers, every
function-local import has a reason, and every module's tests are found by its name.

The layers, lowest first (docs/architecture.md): the JAX-only core, util, model, tokenizer, data,
hf (format codecs), config, run, then evaluate and train side by side, then experiments. A command
module (``cli``, ``__main__``) may import anything: nothing imports it.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "gf_jax")
LAYERS = {"core": 0, "util": 1, "model": 2, "tokenizer": 3, "data": 4, "hf": 5, "config": 6, "run": 7,
          "evaluate": 8, "train": 8, "experiments": 9}
COMMANDS = ("cli", "__main__")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of gf_jax (a package is its ``__init__``)."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, modules: dict) -> list[tuple[str, ast.AST, bool]]:
    """(imported gf_jax module, node, inside a function) of every import in a file, function-local
    ones included. ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``."""
    tree = ast.parse(open(path).read())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names]
        else:
            continue
        out += [(t, node, id(node) in local) for t in dict.fromkeys(targets) if t.split(".")[0] == "gf_jax"]
    return out


def _graph():
    modules = _modules()
    return modules, {m: {t for t, _, _ in _imports(p, modules) if t in modules and t != m} for m, p in modules.items()}


def _cycle(graph: dict) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def test_there_is_no_import_cycle():
    _, graph = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_imports_point_down_the_layers():
    _, graph = _graph()
    upward = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
              if m.rsplit(".", 1)[-1] not in COMMANDS and _layer(t) != _layer(m)
              and LAYERS[_layer(t)] >= LAYERS[_layer(m)]]
    assert not upward, upward


def test_the_core_imports_only_the_core():
    _, graph = _graph()
    for m in ("gf_jax", "gf_jax.goldfish", "gf_jax.loss", "gf_jax.batch"):
        assert {t for t in graph[m] if _layer(t) != "core"} == set(), m


def test_function_local_imports_are_third_party_with_a_reason():
    modules = _modules()
    bad = []
    for path in modules.values():
        lines = open(path).read().split("\n")
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] == "gf_jax" for n in names) or not _has_reason(lines, node.lineno - 1):
                    bad.append(f"{path}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, bad


def _has_reason(lines: list[str], i: int) -> bool:
    """A comment on import line ``i``, or right above the block of import lines it belongs to."""
    while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
        if "#" in lines[i]:
            return True
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


def _tested_modules() -> list[str]:
    """Every module whose tests must be findable: all but package ``__init__`` files (re-exports;
    the root package, the public API, is ``tests/core/test_package.py``) and ``__main__`` files."""
    return sorted(m for m, path in _modules().items()
                  if m == "gf_jax" or os.path.basename(path) not in ("__init__.py", "__main__.py"))


@pytest.mark.parametrize("module", _tested_modules())
def test_each_module_has_tests_named_after_it(module):
    """``gf_jax/<pkg>/<name>.py`` is tested in ``tests/<pkg>/test_<name>.py`` (a core module in
    ``tests/core/``), or its tests say which module they cover in ``TESTED_BY``."""
    parts = module.split(".")[1:]
    folder = parts[0] if len(parts) > 1 else "core"
    name = parts[-1] if parts else "package"
    here = os.path.dirname(__file__)
    assert os.path.isfile(os.path.join(here, folder, f"test_{name}.py")) or module in _covered_elsewhere(), module


def _covered_elsewhere() -> set[str]:
    """Modules whose tests live in another module's test file, as the file's ``COVERS`` tuple says."""
    out = set()
    for folder, _, files in os.walk(os.path.dirname(__file__)):
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                tree = ast.parse(open(os.path.join(folder, f)).read())
                for node in tree.body:
                    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "COVERS" for t in node.targets):
                        out |= set(ast.literal_eval(node.value))
    return out
