"""Every benchmark runs as the script its docs name (`.venv/bin/python benchmarks/x.py`), not only as a module:
one that imports the repo's `tests` or `benchmarks` packages first puts the repo root on sys.path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _top_level_statements(path: Path) -> list[ast.stmt]:
    return ast.parse(path.read_text()).body


def _imports_repo_package(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.ImportFrom) and stmt.module:
        return stmt.module.split(".")[0] in ("tests", "benchmarks")
    if isinstance(stmt, ast.Import):
        return any(alias.name.split(".")[0] in ("tests", "benchmarks") for alias in stmt.names)
    return False


def _inserts_repo_root(stmt: ast.stmt) -> bool:
    return "sys.path.insert" in ast.unparse(stmt)


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_a_script_that_imports_the_repo_puts_it_on_the_path_first(script):
    body = _top_level_statements(script)
    first_import = next((i for i, stmt in enumerate(body) if _imports_repo_package(stmt)), None)
    if first_import is None:
        return
    assert any(_inserts_repo_root(stmt) for stmt in body[:first_import]), (
        f"{script.name} imports the repo's tests/benchmarks packages without putting the repo root on sys.path: "
        f"`python benchmarks/{script.name}` fails with ModuleNotFoundError")
