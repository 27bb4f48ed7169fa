"""The shape of the package: each DVC stage depends on exactly the code it imports, and no module
needs another to be imported first (no import cycles; that each imports alone in a fresh interpreter
is tests/e2e/test_imports.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = SRC / "mnist_vae"


def _module_file(name: str) -> Path | None:
    """The file of a project module (``mnist_vae.x.y``), or None for anything else."""
    if name != "mnist_vae" and not name.startswith("mnist_vae."):
        return None
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every project module that ``path`` imports, at the top or inside a function, with the
    packages that importing it runs (``mnist_vae.stages.train`` runs ``mnist_vae/__init__.py`` and
    ``mnist_vae/stages/__init__.py``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from mnist_vae import tracking` imports the module mnist_vae.tracking
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in found if _module_file(n) is not None}


def import_closure(script: Path) -> set[str]:
    """The project files a script runs: itself and every project module it imports, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_module_file(name) for name in _imports(path))
    return {p.relative_to(ROOT).as_posix() for p in seen}


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage["deps"] if d.endswith(".py")}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_exactly_the_code_it_imports(name: str) -> None:
    stage = STAGES[name]
    script = stage["cmd"].split()[-1]
    assert script == f"pipeline/{name}.py", stage["cmd"]
    closure = import_closure(ROOT / script)
    listed = _code_deps(stage)
    assert not closure - listed, f"{name}: imported but not in dvc.yaml deps: {sorted(closure - listed)}"
    assert not listed - closure, f"{name}: in dvc.yaml deps but not imported: {sorted(listed - closure)}"


def test_evaluation_code_is_not_a_dependency_of_training() -> None:
    train = _code_deps(STAGES["train"])
    download = _code_deps(STAGES["download"])
    for module in (
        "src/mnist_vae/evaluate.py",
        "src/mnist_vae/registry.py",
        "src/mnist_vae/stages/evaluate.py",
    ):
        assert module not in train and module not in download
    assert "src/mnist_vae/fetch.py" not in train, "train must not re-run when the downloader changes"
    assert "src/mnist_vae/train.py" not in download


MODULES = sorted(
    ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
)


def test_no_import_cycles_even_through_imports_inside_functions() -> None:
    graph = {m: {n for n in _imports(_module_file(m)) if n != m} for m in MODULES}
    # A package's __init__ is run by importing its submodules; that edge is not a cycle.
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [])
