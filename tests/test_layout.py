"""The layout draws the architecture: no two project modules import each other, even
through others, and an import inside a function is kept for a heavy or optional
dependency and says so in a comment.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from graft import contract

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("graft", "serving", "training", "console")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "protos" in path.relative_to(ROOT).parts:
                continue  # generated stubs
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imported(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Project modules an import statement names (``from a import b`` may name module a.b)."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return {t for t in targets if t in modules}


def _graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Module -> the project modules it imports anywhere; and every import inside a function."""
    graph: dict[str, set[str]] = {}
    inner = []
    for name, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        edges: set[str] = set()
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    above = "\n".join(lines[max(0, node.lineno - 4):node.lineno])
                    inner.append((name, node.lineno, above))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, modules)
        # A package's own __init__ is imported by each of its modules; that is no edge back.
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph, inner


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_project_modules():
    graph, _ = _graph(_modules())
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_import_inside_a_function_says_why():
    _, inner = _graph(_modules())
    silent = [f"{name}:{line}" for name, line, above in inner if "#" not in above]
    assert silent == [], "an import inside a function needs a comment naming the heavy or optional dependency"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_function_has_a_docstring(package):
    missing = []
    for name, path in _modules().items():
        if not name.startswith(package):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            candidates = [node] + ([n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                                   if isinstance(node, ast.ClassDef) and not node.name.startswith("_") else [])
            for item in candidates:
                if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_")
                        and ast.get_docstring(item) is None):
                    missing.append(f"{name}.{item.name}")
    assert missing == []


@pytest.mark.parametrize("package", ("serving", "training"))
def test_no_name_of_the_contract_is_defined_again(package):
    owned = {name for name, value in vars(contract).items()
             if not name.startswith("_") and getattr(value, "__module__", contract.__name__) == contract.__name__
             and not isinstance(value, type(contract))}
    for name, path in _modules().items():
        if not name.startswith(package):
            continue
        defined = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined.add(node.target.id)
        assert not defined & owned, f"{name} defines {sorted(defined & owned)}, which graft.contract owns"
