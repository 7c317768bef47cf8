"""The package's house rules, read from its source (docs/architecture.md section 5): the data flows one way through the
imports, the run layout has one owner, Ray has one entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "iterit"
MODULES = {
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
    for p in sorted(PACKAGE.rglob("*.py"))
}


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported iterit module, names taken from it) for every import in the module, lazy ones included."""
    out = []
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("iterit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iterit"):
            names = [a.name for a in node.names]
            # `from iterit import cluster` imports the module iterit.cluster
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            out += [(s, []) for s in subs] or [(node.module, names)]
    return out


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{name} imports {mod}.{n}"
        for name in MODULES
        for mod, names in _imports(name)
        for n in names
        if n.startswith("_") and mod != name
    ]
    assert not bad, bad


def test_training_imports_neither_scoring_nor_selection():
    bad = [
        f"{name} imports {mod}"
        for name in MODULES
        if name.startswith("iterit.training")
        for mod, _ in _imports(name)
        if mod.startswith(("iterit.scoring", "iterit.selection"))
    ]
    assert not bad, bad


def test_the_pure_cores_import_no_ray():
    for name in ("iterit.config", "iterit.templates", "iterit.scoring.losses", "iterit.rundir"):
        tops = {
            a.name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
            for n in ast.walk(_tree(name))
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])
        }
        assert "ray" not in tops, name
    # selection.pipeline is selection's Ray Data layer (the TF-IDF rows built by the cluster), as
    # scoring.pipeline is scoring's; everything else of selection is numpy and scipy, but for torch in
    # selection.embedding: its blocked products run on the driver's GPU when it has one (no Ray there).
    for name in [m for m in MODULES if m.startswith("iterit.selection") and m != "iterit.selection.pipeline"]:
        mods = [n for n in ast.walk(_tree(name)) if isinstance(n, (ast.Import, ast.ImportFrom))]
        torch_ok = name == "iterit.selection.embedding"
        assert not any(("torch" in ast.dump(n) and not torch_ok) or "'ray" in ast.dump(n) for n in mods), name


def test_only_cluster_starts_ray():
    callers = {
        name
        for name in MODULES
        for node in ast.walk(_tree(name))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "ray.init"
    }
    assert callers == {"iterit.cluster"}


def test_no_run_path_is_built_outside_rundir():
    """Only rundir.py spells the run layout: no string (or f-string part) that starts with iter_."""
    found = []
    for name in MODULES:
        if name == "iterit.rundir":
            continue
        tree = _tree(name)
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                # a path or a part of one (help texts with an example path in prose are not)
                if node.value.startswith("iter_") or ("/iter_" in node.value and " " not in node.value):
                    found.append(f"{name}:{node.lineno}: {node.value[:40]!r}")
    assert not found, found


def _graph() -> dict[str, set[str]]:
    """Module -> iterit modules it imports at module level (lazy imports inside functions break cycles)."""
    graph = {}
    for name in MODULES:
        deps = set()
        for node in _tree(name).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iterit"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("iterit")}
        graph[name] = {d for d in deps if d in MODULES and d != name}
    return graph


def test_module_level_imports_have_no_cycle():
    graph, state = _graph(), {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        if state.get(n) == "open":
            pytest.fail(" -> ".join([*path[path.index(n) :], n]))
        state[n] = "open"
        for d in sorted(graph[n]):
            visit(d, [*path, n])
        state[n] = "done"

    for n in graph:
        visit(n, [])
