"""Import layering, read from the source (ast; nothing is imported): the modules of ``pipeline/store`` import one
way only (no cycle, counting imports inside functions too), and ``featup_ops/`` and ``kernels/`` import neither Ray
nor Zarr (the model code runs without the pipeline's cluster and storage)."""
from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "pipeline" / "store"
PACKAGE = "pipeline.store"


def imported_modules(path: Path, package: str) -> Iterator[str]:
    """Every module ``path`` imports, anywhere in the file (top level, functions, ``TYPE_CHECKING`` blocks), as a
    dotted name; ``from X import name`` gives ``X.name`` as well as ``X`` (``name`` may be a submodule)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def store_graph() -> dict[str, set[str]]:
    """``{module: modules of pipeline/store it imports}`` by short name. The package's ``__init__`` re-exports
    names of its submodules lazily (by module name, as strings), so it depends on every submodule it names."""
    names = {p.stem for p in STORE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(STORE.glob("*.py")):
        deps: set[str] = set()
        for mod in imported_modules(path, PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"):
            if mod == PACKAGE:
                deps.add("__init__")
            elif mod.startswith(PACKAGE + ".") and mod.split(".")[2] in names:
                deps.add(mod.split(".")[2])
        if path.stem == "__init__":
            consts = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
            deps |= names & consts
        deps.discard(path.stem)
        graph[path.stem] = deps
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None when the graph has none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"checksum": {"zarr_store"}, "zarr_store": {"foreign"}, "foreign": {"checksum"}}) == [
        "checksum", "zarr_store", "foreign", "checksum"]
    assert find_cycle({"x": {"y"}, "y": {"y", "z"}, "z": {"x"}}) is not None


def test_store_modules_import_one_way():
    graph = store_graph()
    assert {"schema", "foreign", "zarr_store", "checksum", "sink"} <= set(graph)
    # the edges the layering rests on, so that a parser that saw nothing cannot pass
    assert {"foreign", "schema"} <= graph["zarr_store"] and "zarr_store" in graph["checksum"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in pipeline/store: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", ["featup_ops", "kernels"])
def test_model_code_imports_neither_ray_nor_zarr(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    found = [f"{p.relative_to(REPO)}: {mod}" for p in files for mod in imported_modules(p, package)
             if mod.split(".")[0] in ("ray", "zarr")]
    assert not found, f"{package}/ must not import Ray or Zarr: {found}"
