"""The package's import graph has no circles: every module imports only modules below it (a
function-level import counts as an import: it is a circle that only waits to be hit)."""

import ast
from pathlib import Path

import networkx as nx

import mqc

ROOT = Path(mqc.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, modules: set[str]) -> list[str]:
    """The mqc modules an import statement names (``from a import b``: the module ``a.b`` if there is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        found = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
        return found or ([node.module] if node.module in modules else [])
    return []


def runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (type names, never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def import_graph() -> nx.DiGraph:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        for node in runtime_nodes(ast.parse(path.read_text())):
            for target in imported(node, set(files)):
                if target != name:
                    graph.add_edge(name, target)
    return graph


def test_no_import_circles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_plan_types_are_leaves():
    """The plan types, the cost table and the knapsack import no pass, analysis or lowering code."""
    graph = import_graph()
    for leaf in ("mqc.planning.types", "mqc.planning.costs", "mqc.planning.knapsack"):
        below = nx.descendants(graph, leaf)
        assert not {m for m in below if m.startswith(("mqc.analysis", "mqc.lowering", "mqc.passes"))}, leaf
