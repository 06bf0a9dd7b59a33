"""The import structure: no circles (imports inside functions included), the layers point one
way (tests/integration/test_import_alone.py imports each module in a fresh interpreter)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("exploop", "workers", "admin")

#: Who may import whom: a module of the key's layer imports only from the layers listed.
#: The kernel (exploop's top-level modules) is shared by the API, the agents and the CLI.
LAYERS = {
    "exploop": {"exploop"},
    "exploop.core": {"exploop", "exploop.core"},
    "exploop.api": {"exploop", "exploop.core", "exploop.api"},
    "exploop.run": {"exploop", "exploop.core", "exploop.api", "exploop.run"},
    "workers": {"exploop", "workers"},
    "admin": {"exploop", "admin"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "sample_repo" in path.parts or "migrations" in path.parts:
                continue
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every product module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import sub`` imports the submodule, ``from pkg import name`` the package.
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` -> the nearest module we own
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _unresolved(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """Imports of our packages naming a module that does not exist (a lazy import the move
    missed fails only when its function runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    missing = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES and target not in modules:
                missing.append(f"{name}:{node.lineno} imports {target}")
    return missing


def test_every_import_of_our_modules_resolves():
    modules = _modules()
    assert [m for name, path in modules.items() for m in _unresolved(name, path, modules)] == []


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def _layer(module: str) -> str:
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} belongs to no layer")


def test_no_import_circles_counting_imports_inside_functions():
    graph = _graph()
    assert len(graph) > 30
    assert _circles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_point_one_way():
    wrong = sorted(f"{module} -> {target}" for module, targets in _graph().items() for target in targets
                   if _layer(target) not in LAYERS[_layer(module)])
    assert wrong == []
