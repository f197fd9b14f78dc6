"""The import graph of the tree: no cycles anywhere (across packages too, lazy imports inside functions
included), and the simulator and the decision cores never reach gRPC or the wire contract.

`lint-imports` (``make lint``, contracts in pyproject.toml) checks sibling cycles package by package; this test
checks the whole graph at once with grimp (import-linter's own graph library), so a cycle through two packages
(``bench`` -> ``services.cli`` -> ``bench``) fails too. Tarjan's strongly connected components: any component
of more than one module is a cycle.
"""

from __future__ import annotations

import sys

import grimp
import pytest

PACKAGES = ("services", "simulator", "bench")
CORES = ("simulator", "services.engine.batch_rules", "services.engine.core", "services.engine.local_autoscaler",
         "services.global_scaler.policy", "services.queue.core", "services.queue.estimator", "services.router.routing",
         "services.slo")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, "chiron", include_external_packages=True)


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm over ``edges`` (module -> modules it imports); components of 2+ modules, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def test_strongly_connected_finds_a_cycle_and_only_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycles(graph):
    ours = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    edges = {m: {n for n in graph.find_modules_directly_imported_by(m) if n in ours} for m in ours}
    assert strongly_connected(edges) == []


@pytest.mark.parametrize("core", CORES)
def test_cores_reach_neither_grpc_nor_the_wire_contract(graph, core):
    for forbidden in ("grpc", "chiron.v1"):
        chain = graph.find_shortest_chain(importer=core, imported=forbidden, as_packages=True)
        assert chain is None, f"{core} reaches {forbidden}: {' -> '.join(chain)}"


def _python_files(*folders: str) -> list:
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    return [p for f in folders for p in sorted((root / f).rglob("*.py")) if "_pb2" not in p.name]


def test_module_docstrings_within_30_lines_and_functions_within_80_in_services_and_simulator():
    """The size limits of the codebase (design decisions live in docs/decisions/, not in module docstrings)."""
    import ast

    too_long = []
    for path in _python_files("services", "simulator", "bench"):
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree, clean=False)
        if doc and doc.count("\n") + 1 > 30:
            too_long.append(f"{path.name}: module docstring of {doc.count(chr(10)) + 1} lines")
        if path.parts[-2] == "bench" or "bench" in path.parts[-3:-1]:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                too_long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
