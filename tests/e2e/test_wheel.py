"""The package as a user gets it: build a wheel, install it into a fresh venv, run the main job and export.

The fresh venv sees the dependencies of this .venv (torch, transformers, matplotlib, ...) through a .pth
line, so the test stays offline and fast; softmoe itself comes only from the wheel (the .venv's editable
install is not activated there: a .pth path line does not process that directory's own .pth files).

Run: .venv/bin/python -m pytest -q tests/e2e/test_wheel.py
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import softmoe

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("softmoe", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CITATION.cff")


def run(*cmd, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", out, src, cwd=src)
    (found,) = out.glob("softmoe-*.whl")
    return found


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "softmoe/configs/tiny/softmoe.yaml" in names and "softmoe/configs/studies/small.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch>=") for r in core) and not any("torch==" in r for r in requires)
    for optional in ("matplotlib", "tensorboard", "transformers", "rich"):
        assert not any(r.startswith(optional) for r in core), f"{optional} must be an extra, not a core dependency"
    assert {"hf", "viz", "eval"} <= {line.split(":", 1)[1].strip() for line in meta.splitlines()
                                     if line.startswith("Provides-Extra:")}
    assert f"Version: {softmoe.__version__}" in meta


def test_installed_wheel_runs_the_main_job_and_export(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # this .venv's packages, without processing its .pth files (so its editable softmoe stays out)
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel,
        cwd=tmp_path)
    softmoe_cmd = venv / "bin" / "softmoe"
    work = tmp_path / "work"
    work.mkdir()
    located = run(python, "-c", "import softmoe; print(softmoe.__file__)", cwd=work).stdout.strip()
    assert Path(located).is_relative_to(venv), located  # the wheel's copy, not the source tree
    assert run(softmoe_cmd, "--version", cwd=work).stdout.strip() == f"softmoe {softmoe.__version__}"
    run(softmoe_cmd, "main", "--preset", "tiny", "--out", "runs", "train.progress=false", cwd=work)
    assert (work / "runs" / "report.md").is_file()
    run(softmoe_cmd, "export", "--checkpoint", "runs/tiny-softmoe", "--out", "hf", cwd=work)
    assert (work / "hf" / "config.json").is_file()
