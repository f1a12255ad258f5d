"""The documented ways in keep working: the `softmoe` script of pyproject.toml, `python -m softmoe.cli` (a pinned
study calls `python -m softmoe.cli compare ...`) and `python -m softmoe.train` (what torchrun launches), each
with a user's mistake reported as one line and exit status 2.

Run: .venv/bin/python -m pytest -q tests/e2e/test_entry_points.py
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_the_console_script_points_at_the_command_line():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["softmoe"].partition(":")
    from softmoe.cli.app import main

    assert getattr(importlib.import_module(module), name) is main


@pytest.mark.parametrize("argv, usage", [
    (("-m", "softmoe.cli", "--help"), "usage: softmoe [-h] [--version]"),
    (("-m", "softmoe.cli", "compare", "--help"), "usage: softmoe compare"),
    (("-m", "softmoe.train", "--help"), "usage: softmoe train"),
])
def test_module_entry_points_print_their_help(argv, usage):
    result = _run(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)


@pytest.mark.parametrize("argv, line", [
    (("-m", "softmoe.cli", "compare", "--config", "configs/studies/tiny.yaml", "--jobs", "0"),
     "softmoe compare: --jobs=0 must be >= 1"),
    (("-m", "softmoe.cli", "demo", "--seed", "-1"), "softmoe demo: --seed=-1 must be in [0, 2**63)"),
    (("-m", "softmoe.train", "--config", "tiny/softmoe", "--resume", "--overwrite"),
     "softmoe train: --resume and --overwrite exclude each other"),
])
def test_a_users_mistake_is_one_line_and_exit_2(argv, line):
    result = _run(*argv)
    assert result.returncode == 2 and result.stderr.strip() == line and result.stdout == ""


def test_every_documented_module_entry_point_exists():
    import importlib.util
    import re

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    named = {m for doc in docs for m in re.findall(r"-m (softmoe(?:\.\w+)*)", doc.read_text())}
    assert "softmoe.train" in named
    for module in sorted(named):
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"the docs run `python -m {module}`, which does not exist"
        if spec.submodule_search_locations:  # a package runs its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module
