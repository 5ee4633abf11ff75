"""The shape of the code: small modules, short functions, a core that needs nothing installed."""

from __future__ import annotations

import ast
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "supervisord"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# Declarative tables: one statement per metric declared, nothing to split.
TABLES = {"supervisord/observe/metrics.py:Metrics.__init__"}


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            found.append((prefix + node.name, node.end_lineno - node.lineno + 1))
            found += _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            found += _functions(node, f"{prefix}{node.name}.")
    return found


def test_no_module_over_450_lines_and_no_function_over_60() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT).as_posix()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {lines} lines")
        for name, length in _functions(ast.parse(source)):
            if length > MAX_FUNCTION_LINES and f"{rel}:{name}" not in TABLES:
                too_long.append(f"{rel}:{name}: {length} lines")
    assert too_long == []


@pytest.mark.parametrize("module", ["supervisord.core.policy", "supervisord.core"])
def test_the_core_imports_in_a_bare_venv(tmp_path: Path, module: str) -> None:
    """``python -I`` in a fresh venv holding only the project's source: no psutil, anyio,
    structlog or tomli-w to lean on, no PYTHONPATH, no user site."""
    env_dir = tmp_path / "bare"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "project-source.pth").write_text(f"{ROOT}\n")
    probe = (
        f"import {module}, sys; "
        "names = ('psutil', 'anyio', 'structlog', 'tomli_w'); "
        "print(sorted(m for m in names if m in sys.modules))"
    )
    done = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # And truly bare: the installed packages are not there to be found by accident.
    missing = subprocess.run(
        [python, "-I", "-c", "import psutil"], capture_output=True, text=True, check=False
    )
    assert missing.returncode != 0
    assert sys.prefix != str(env_dir)
