"""The shape of the package: backends sit below the public layer, imports form no cycle, and
modules stay small (docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ptx_numba"
BACKEND_DIRS = ("reference", "cpu", "gpu")
PUBLIC = {"api", "losses", "logprobs", "linear", "_ops", "torch", "cli", "dask", "rlhf"}
MAX_LINES = 420


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """``ptx_numba`` modules imported by the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("ptx_numba"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ptx_numba"))
    return found


FILES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in FILES if p.relative_to(PKG).parts[0] in BACKEND_DIRS],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_backends_never_import_the_public_layer(path):
    bad = {m for m in _imports(path, top_level_only=False)
           if m.split(".")[1:2] and m.split(".")[1] in PUBLIC}
    assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"


def test_top_level_imports_have_no_cycle():
    known = {_module_name(p) for p in FILES}
    graph = {}
    for p in FILES:
        deps = {m for m in _imports(p, top_level_only=True) if m in known}
        graph[_module_name(p)] = deps - {_module_name(p)}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            # importing a package's own submodule from its __init__ is not a cycle
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PKG)} has {lines} lines (keep modules under ~400)"
