"""The shape of the package: each DVC stage depends on exactly the code it imports, and no module
needs another to be imported first (no import cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
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


_IMPORT_EACH_ALONE = """
import importlib, sys, traceback
failed = []
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n == "mnist_vae" or n.startswith("mnist_vae.")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception:
        failed.append(module + ": " + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_alone() -> None:
    """Importing any one module first works: no import cycle is hidden by the order in which other
    modules happen to be imported. One interpreter, the project's modules forgotten between imports
    (a cycle is among them; torch and mlflow stay loaded, which keeps this fast)."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_ALONE, *MODULES], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
