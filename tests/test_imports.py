"""The package's import graph has no circle and no module reaches another's private names.

Walks every module of ``cronfile`` with :mod:`ast` (nothing is imported), so a circle
papered over with a lazy import inside a function is still a circle here. ``if
TYPE_CHECKING:`` imports count too: a type-only import back into a module is the same
coupling, only hidden from the interpreter.

Private access across modules is caught two ways:

* ``from cronfile.x import _name`` or ``cronfile.x._name`` (via an imported module);
* ``obj._name`` where ``_name`` is defined by another module of the package (a method,
  a function, or an attribute assigned there) and not by the module doing the access:
  that is one object's internals read or written from outside its own module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cronfile"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES: dict[str, ast.Module] = {name: ast.parse(path.read_text(), str(path))
                                for name, path in MODULES.items()}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """(imported cronfile module, line) for every import anywhere in ``module``."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:  # ``from package import module``
                    yield sub, node.lineno
                elif source in MODULES:
                    yield source, node.lineno


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports_of(m) if target != m} for m in MODULES}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a
    closed path through it for the message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def _defined_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, methods, classes, and attributes it
    assigns (``self._x = ...``, ``x._y = ...``, class-level ``_z = ...``, dataclass fields)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if _is_private(n)}


DEFINED = {m: _defined_private_names(t) for m, t in TREES.items()}


def private_violations() -> list[str]:
    owners: dict[str, set[str]] = {}
    for module, names in DEFINED.items():
        for name in names:
            owners.setdefault(name, set()).add(module)
    found = []
    for module, tree in TREES.items():
        imported_modules: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(module, node)
                for alias in node.names:
                    if source.startswith("cronfile") and _is_private(alias.name) \
                            and source != module:
                        found.append(f"{module}:{node.lineno}: from {source} import {alias.name}")
                    if f"{source}.{alias.name}" in MODULES:
                        imported_modules[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        imported_modules[alias.asname] = alias.name
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Name) and value.id in imported_modules:
                found.append(f"{module}:{node.lineno}: {value.id}.{node.attr} "
                             f"(private name of {imported_modules[value.id]})")
                continue
            others = owners.get(node.attr, set()) - {module}
            if others and node.attr not in DEFINED[module]:
                found.append(f"{module}:{node.lineno}: .{node.attr} belongs to "
                             f"{', '.join(sorted(others))}")
    return found


def test_the_walk_sees_the_whole_package() -> None:
    assert "cronfile.center.daemon" in MODULES and "cronfile.transports.executor" in MODULES
    assert any(imports_of("cronfile.center.daemon"))


def test_no_import_circle() -> None:
    cycles = find_cycles(graph())
    assert cycles == [], "import circles (module level, lazy and TYPE_CHECKING imports): " + \
        "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_module() -> None:
    assert private_violations() == []


OPTIONAL_DRIVERS = ("psycopg", "aiohttp")
"""Imported only by a center started with ``--ha`` / ``--http`` (or a query with ``--ha``):
each costs a start ~0.3-1 s on a busy machine, and most centers and every CLI call use neither."""


def test_a_plain_center_and_the_cli_do_not_load_the_optional_drivers() -> None:
    probe = ("import sys, cronfile.center.daemon, cronfile.cli.app, cronfile.agent.daemon; "
             f"print([m for m in {OPTIONAL_DRIVERS!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_cycle_finder(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert sorted(find_cycles(edges)) == expected
