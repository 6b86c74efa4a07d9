"""No import cycles inside upshift_platform, and no module that only works when imported in the right order.

The graph is read from the source (``ast``), with every import counted: module level, inside
functions, and under ``TYPE_CHECKING``; a cycle is a strongly connected component of more than
one module (or a module importing itself).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "upshift_platform"



def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # ``from . import x`` names a module when x is one, else something of the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {t for t in targets if t in modules}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components with more than one module, or with a self-import (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "upshift_platform.routing" in graph["upshift_platform.handlers.billing"]  # from ..routing import
    assert "upshift_platform.cursor" in graph["upshift_platform.handlers.billing"]  # from .. import cursor
    assert "upshift_platform.server" in graph["upshift_platform.cli"]  # inside a function


def test_no_import_cycles():
    assert cycles(import_graph()) == set()


def test_a_cycle_would_be_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == {frozenset("abc"), frozenset("e")}


def test_every_handler_module_is_served():
    """``build_routers`` imports the handler modules by name: one that fails to import fails the app."""
    from upshift_platform.app import build_routers

    served = {route.endpoint.__module__ for router in build_routers().values() for route in router.routes}
    handlers = {module_name(p) for p in (PACKAGE / "handlers").glob("*.py") if p.name != "__init__.py"}
    assert served == handlers
