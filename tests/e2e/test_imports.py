"""Every module of the package imports alone, first, in a fresh interpreter: no import cycle is
hidden by the order in which other modules happen to be imported (the static check of the import
graph is tests/unit/test_layout.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[2] / "src"
MODULES = sorted(
    ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
    for p in (SRC / "mnist_vae").rglob("*.py")
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
        [sys.executable, "-c", _IMPORT_EACH_ALONE, *MODULES], capture_output=True, text=True, cwd=SRC.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
