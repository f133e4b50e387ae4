"""The code's shape, kept: read from the source's imports and names (nothing is run).

- The HTTP layer (`server/`) imports nothing of the engine's internals (its keys, batch rows,
  telemetry, layers) and names no method in its code: it loops over the registry.
- The engine package names no method either.
- The SDK (`clients/sdk`) imports nothing from `server/` or `steering/`.
- No import cycle between modules (module-level imports: an import inside a function is a
  late binding, as the gates' lookup of the registry's stages).
- No source file in `server/` or `steering/` over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from steering.methods.registry import METHODS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "steering", "clients")
MAX_LINES = 500

# What the HTTP layer may use of `steering`: the errors, prompt shapes, artifact stores, the
# engine's public modules, and the methods' registry, plan and descriptor base.
SERVER_MAY_IMPORT = ("steering.errors", "steering.framing", "steering.artifacts",
                     "steering.engine.engine", "steering.engine.client", "steering.engine.args",
                     "steering.methods.base", "steering.methods.plan", "steering.methods.registry")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*packages: str) -> dict[str, Path]:
    return {module_name(p): p for package in packages
            for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The modules `path` imports (a `from pkg import name` counts `pkg.name` when that is a
    module of ours, else `pkg`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also what sits under `if TYPE_CHECKING:` and `try:` at module level
        nodes = [n for node in nodes for n in ast.walk(node)
                 if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = set()
    known = sources(*PACKAGES)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return found


def code_names(path: Path) -> set[str]:
    """Identifiers and string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef,
                                       ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            names.add(node.value)
    return names


METHOD_NAMES = {m.name for m in METHODS}


@pytest.mark.parametrize("module", sorted(sources("server")))
def test_the_http_layer_uses_only_the_engines_public_modules(module):
    path = sources("server")[module]
    used = {m for m in imports(path, top_level_only=False) if m.startswith("steering")}
    assert {m for m in used if m not in SERVER_MAY_IMPORT} == set()


@pytest.mark.parametrize("module", sorted(sources("server", "steering/engine")))
def test_the_http_layer_and_the_engine_name_no_method(module):
    path = sources("server", "steering/engine")[module]
    named = code_names(path) & (METHOD_NAMES | {f"steering.{n}" for n in METHOD_NAMES})
    assert named == set()


def test_the_sdk_imports_nothing_from_the_server_or_the_methods():
    for module, path in sources("clients/sdk").items():
        used = imports(path, top_level_only=False)
        assert {m for m in used if m.split(".")[0] in ("server", "steering")} == set(), module


def test_no_import_cycle():
    modules = sources(*PACKAGES)
    graph = {name: {m for m in imports(path, top_level_only=True) if m in modules}
             for name, path in modules.items()}
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert cycles == []


def test_no_source_file_is_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in sorted(ROOT.glob("s*/**/*.py"))
            if p.parts[len(ROOT.parts)] in ("server", "steering")
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_rules_see_a_breach():
    """The checks above can fail: the old shape broke each of them."""
    old_http = "from steering.runtime.keys import PREFIX\nMETHOD = 'particles'\n"
    tmp = ROOT / "server" / "_layout_probe.py"
    tmp.write_text(old_http)
    try:
        assert "steering.runtime.keys" in imports(tmp, top_level_only=False)
        assert "particles" in code_names(tmp)
    finally:
        tmp.unlink()
    assert [sorted(c) for c in _strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()})
            if len(c) > 1] == [["a", "b"]]


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out
