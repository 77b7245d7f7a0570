"""The house reads upward: every import of the library points to a lower floor, and no import runs in a circle.

Floors, from the ground: utils -> data, metrics -> modules -> retrieval -> pipelines -> callbacks, benchmark,
demo, service -> entry points. Imports inside functions count too: they are the same dependency, only later.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {
    "utils": 0,
    "data": 1,
    "metrics": 1,
    "modules": 2,
    "retrieval": 3,
    "pipelines": 4,
    "callbacks": 5,
    "benchmark": 5,
    "demo": 5,
    "service": 5,
}


def library_imports() -> dict[str, set[str]]:
    """``src.a.b`` -> the ``src.*`` modules it imports (relative to the repository root)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted((ROOT / "src").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src."):
                edges[name].add(node.module)
            elif isinstance(node, ast.Import):
                edges[name] |= {alias.name for alias in node.names if alias.name.startswith("src.")}
    return edges


def package(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_floor():
    packages = {p.name for p in (ROOT / "src").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(FLOORS), f"packages without a floor: {packages - set(FLOORS)}"


def test_imports_point_down_only():
    upward = [
        f"{module} -> {target}"
        for module, targets in library_imports().items()
        for target in targets
        if package(target) != package(module) and FLOORS[package(target)] >= FLOORS[package(module)]
    ]
    assert not upward, "imports that run up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    edges = library_imports()
    modules = set(edges) | {t for targets in edges.values() for t in targets}
    circles = [c for c in strongly_connected(modules, edges) if len(c) > 1]
    assert not circles, f"import circles: {circles}"


def strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively (the graph is small, but recursion depth is not worth a thought)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


@pytest.mark.parametrize(
    "edges, circular",
    [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": {"c"}}, False), ({"a": {"a"}}, False)],
)
def test_the_circle_finder_finds_circles(edges, circular):
    nodes = set(edges) | {t for targets in edges.values() for t in targets}
    assert any(len(c) > 1 for c in strongly_connected(nodes, edges)) is circular


def test_notebooks_are_kept_without_outputs():
    """nbstripout --verify: outputs and execution counts stay out of git (CI runs the notebooks instead)."""
    import subprocess
    import sys

    notebooks = sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 4
    result = subprocess.run(
        [sys.executable, "-m", "nbstripout", "--verify", *notebooks], capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"notebooks with outputs (run nbstripout on them): {result.stdout}{result.stderr}"
    )
