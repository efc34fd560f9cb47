"""The package's layers, checked from its source with ``ast`` (nothing is imported or run).

    base < method < engine < distributed < experiments < cli

A module may import its own layer and the layers below it; only ``sylva_ray.distributed`` imports
``ray``; no import cycle anywhere (function-level and ``TYPE_CHECKING`` imports count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sylva_ray"
LAYERS = ["base", "method", "engine", "distributed", "experiments", "cli"]
RAY_LAYER = "distributed"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(module: str) -> set[str]:
    """Every module name an import statement of ``module`` names, wherever the statement is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def package_imports(module: str) -> set[str]:
    return {name for name in imported_names(module) if name in MODULES and name != module}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"  # sylva_ray, __main__: the entry points


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_imports_and_cycles():
    """The checks below can fail: a hand-made cycle is found, and relative imports resolve."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert "sylva_ray.engine.federation" in package_imports("sylva_ray.engine.runner")
    assert "ray" in imported_names("sylva_ray.distributed.actors")


def test_no_import_cycle_in_the_package():
    assert cycles({module: package_imports(module) for module in MODULES}) == []


def test_only_the_distributed_package_imports_ray():
    users = sorted(m for m in MODULES if any(n == "ray" or n.startswith("ray.") for n in imported_names(m)))
    assert users and all(layer_of(m) == RAY_LAYER for m in users), users


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) in LAYERS))
def test_imports_go_down_the_layers_only(module):
    rank = LAYERS.index(layer_of(module))
    upward = sorted(
        target
        for target in package_imports(module)
        if layer_of(target) in LAYERS and LAYERS.index(layer_of(target)) > rank
    )
    assert upward == [], f"{module} ({layer_of(module)}) imports from a higher layer: {upward}"


def test_every_module_belongs_to_a_layer():
    """A new module lands in one of the layer folders (or is an entry point at the top)."""
    loose = sorted(m for m in MODULES if layer_of(m) == "top")
    assert loose == ["sylva_ray", "sylva_ray.__main__"]
