"""The shape of the package: its rooms and what each may import, each DVC stage's code dependencies
against what its script imports, and no module needing another to be imported first (no import
cycles; that each imports alone in a fresh interpreter is tests/e2e/test_imports.py)."""

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


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _code_deps(stage: dict) -> list[str]:
    return [d for d in stage["deps"] if d.startswith("src/") or d.endswith(".py")]


def _covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def _covered(stage: dict) -> set[str]:
    """The project files a stage's deps cover: files themselves, folders with every module in them."""
    out: set[str] = set()
    for dep in _code_deps(stage):
        target = ROOT / dep
        files = target.rglob("*.py") if target.is_dir() else [target]
        out.update(f.relative_to(ROOT).as_posix() for f in files if "__pycache__" not in f.parts)
    return out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_the_code_it_imports(name: str) -> None:
    stage = STAGES[name]
    script = stage["cmd"].split()[-1]
    assert script == f"pipeline/{name}.py", stage["cmd"]
    closure = import_closure(ROOT / script)
    missing = closure - _covered(stage)
    assert not missing, f"{name}: imported but not covered by dvc.yaml deps: {sorted(missing)}"
    for dep in _code_deps(stage):
        assert (ROOT / dep).exists(), f"{name}: dvc.yaml dep {dep} does not exist"
        assert any(_covers(dep, path) for path in closure), f"{name}: dvc.yaml dep {dep} is not imported"


@pytest.mark.parametrize(
    ("stage", "room"),
    [
        ("download", "src/mnist_vae/models"),
        ("download", "src/mnist_vae/training"),
        ("train", "src/mnist_vae/data/fetch.py"),
        ("train", "src/mnist_vae/evaluation"),
        ("train", "src/mnist_vae/registry/registration.py"),
        ("train", "src/mnist_vae/registry/gate.py"),
        ("train", "src/mnist_vae/serving"),
        ("train", "src/mnist_vae/stages/evaluate.py"),
        ("evaluate", "src/mnist_vae/training"),
        ("evaluate", "src/mnist_vae/data/fetch.py"),
        *((stage, room) for stage in STAGES for room in ("src/mnist_vae/bench", "src/mnist_vae/tuning")),
        *((stage, "src/mnist_vae/cli") for stage in STAGES),
    ],
)
def test_editing_a_room_reruns_only_the_stages_that_run_it(stage: str, room: str) -> None:
    """Editing evaluation code never retrains; editing the downloader never retrains; editing the
    benchmarks, the search or the CLI reruns no stage."""
    hit = [path for path in _covered(STAGES[stage]) if _covers(room, path)]
    assert not hit, f"{stage} depends on {room}: {hit}"


def test_dvc_yaml_lists_the_params_each_stage_reads_in_its_own_section() -> None:
    """The params of dvc.yaml name sections that exist (what each stage reads is
    tests/e2e/test_params_read.py)."""
    from mnist_vae.config import Params

    fields = Params.model_fields
    for name, stage in STAGES.items():
        for key in stage["params"]:
            section, _, leaf = key.partition(".")
            assert section in fields, f"{name}: unknown params section {section}"
            if leaf:
                assert leaf in fields[section].annotation.model_fields, f"{name}: unknown param {key}"


# Rooms bottom up, and the rooms each may import (the top-level modules are the room "").
ROOMS: dict[str, set[str]] = {
    "": set(),
    "data": set(),
    "models": set(),
    "stack": set(),
    "training": {"data", "models"},
    "evaluation": {"data", "models"},
    "serving": {"data", "models"},
    "registry": {"data", "models", "evaluation", "serving"},
    "tuning": {"data", "models", "training", "evaluation", "serving", "registry"},
    "bench": {"data", "models", "training", "evaluation", "serving", "registry"},
    "stages": {"data", "models", "training", "evaluation", "serving", "registry"},
    "demo": {"data", "models", "evaluation", "serving", "registry"},
    "cli": {
        "data",
        "models",
        "training",
        "evaluation",
        "serving",
        "registry",
        "tuning",
        "bench",
        "stages",
        "stack",
        "demo",
    },
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


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


def test_no_room_imports_a_room_above_it() -> None:
    assert set(ROOMS) == {""} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    for module in MODULES:
        room = _room(module)
        for dep in _imports(_module_file(module)):
            other = _room(dep)
            if other and other != room:
                assert other in ROOMS[room], f"{module} ({room or 'top level'}) imports {dep} ({other})"


def test_the_top_level_holds_at_most_eight_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_each_room_opens_with_a_docstring_saying_what_it_holds(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 20, f"{package}/__init__.py: no docstring, or a bare one"


LONG_MODULE = 300


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.relative_to(PACKAGE).as_posix()
)
def test_a_module_over_300_lines_says_why(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= LONG_MODULE or "Over 300 lines" in doc, f"{lines} lines and no reason in its docstring"
