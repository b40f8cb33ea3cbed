"""The package's import graph has no cycle: every `import` inside `src/hf_fwsvd` (also those inside functions) is an
edge, read with `ast` without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "hf_fwsvd"
ROOT = Path(__file__).resolve().parent.parent / "src" / PACKAGE


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """hf_fwsvd module -> the hf_fwsvd modules it imports (the root package itself is left out: nothing imports it)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                names = [f"{base}.{alias.name}" for alias in node.names]
                targets = [full if full in modules else base for full in names]
            for target in targets:
                while target and target not in modules:  # `import hf_fwsvd.x.y` -> the deepest known module
                    target = target.rpartition(".")[0]
                if target and target != PACKAGE and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path ``[a, b, ..., a]``, or `None`."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "hf_fwsvd.pipeline" in graph["hf_fwsvd.api"] and "hf_fwsvd.quantizer" in graph["hf_fwsvd.api"]
    assert "hf_fwsvd.methods" in graph["hf_fwsvd.config"]  # function-level imports count too:
    assert "hf_fwsvd.pipeline" in graph["hf_fwsvd.quantizer"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["hf_fwsvd.pipeline"].add("hf_fwsvd.api")  # what `api` passing itself into the pipeline would add
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"hf_fwsvd.api", "hf_fwsvd.pipeline"} <= set(cycle)
