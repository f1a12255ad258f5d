"""The package as a user gets it: build a wheel, install it into fresh venvs, run the main job and export.

A fresh venv sees installed packages of this .venv through a .pth line, so the test stays offline and fast;
softmoe itself comes only from the wheel (the .venv's editable install is not activated there: a .pth path
line does not process that directory's own .pth files). The core-only venv sees just the wheel's core
requirements and what they require (a folder of links to those distributions' files): `pip install softmoe`
without extras. The venv with extras sees all of this .venv (transformers, matplotlib, ...).

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


def _core_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [line.split(":", 1)[1].strip() for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def core_only_site(wheel: Path, dest: Path) -> Path:
    """A folder of links to the files of the wheel's core requirements and their own requirements (no extras),
    taken from this .venv: what `pip install softmoe` would give, offline."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo, seen = [Requirement(r) for r in _core_requirements(wheel)], set()
    dest.mkdir()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        dist = metadata.distribution(req.name)
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        todo += [Requirement(r) for r in dist.requires or []]
        root = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (root / top).exists() and not (dest / top).exists() and not top.endswith(".pth"):
                (dest / top).symlink_to(root / top)
    assert {"torch", "numpy", "safetensors", "tokenizers"} <= seen
    assert not seen & {"matplotlib", "transformers", "tensorboard", "rich"}, seen
    return dest


def fresh_venv(wheel: Path, where: Path, site_dirs: list[str]) -> Path:
    """A venv at `where` with the wheel installed and `site_dirs` on its path; returns its bin/ folder."""
    run(sys.executable, "-m", "venv", "--without-pip", where, cwd=where.parent)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(where), "platbase": str(where)}))
    (purelib / "deps.pth").write_text("\n".join(site_dirs) + "\n")
    run(sys.executable, "-m", "pip", "--python", where / "bin" / "python", "install", "--no-deps", "--no-index",
        "-q", wheel, cwd=where.parent)
    return where / "bin"


def test_core_only_install_runs_the_main_job_and_extras_export_it(wheel, tmp_path):
    """`pip install softmoe` (no extras): `softmoe main --preset tiny` exits 0 with report.md (no plots, and how to
    get them); export says which extra it needs. With the extras: export of that run."""
    core = fresh_venv(wheel, tmp_path / "core", [str(core_only_site(wheel, tmp_path / "core-site"))])
    work = tmp_path / "work"
    work.mkdir()
    located = run(core / "python", "-c", "import softmoe; print(softmoe.__file__)", cwd=work).stdout.strip()
    assert Path(located).is_relative_to(tmp_path / "core"), located  # the wheel's copy, not the source tree
    assert run(core / "softmoe", "--version", cwd=work).stdout.strip() == f"softmoe {softmoe.__version__}"
    out = run(core / "softmoe", "main", "--preset", "tiny", "--out", "runs", "train.progress=false",
              "train.steps=10", cwd=work).stdout
    report = (work / "runs" / "report.md").read_text()
    assert "No plots" in report and "pip install 'softmoe[viz]'" in report, report
    assert "without plots" in out and not list((work / "runs").glob("*.png"))
    proc = subprocess.run([core / "softmoe", "export", "--checkpoint", "runs/tiny-softmoe", "--out", "hf"], cwd=work,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "pip install 'softmoe[hf]'" in proc.stderr, proc.stderr

    full = fresh_venv(wheel, tmp_path / "full", site.getsitepackages())
    run(full / "softmoe", "export", "--checkpoint", "runs/tiny-softmoe", "--out", "hf", cwd=work)
    assert (work / "hf" / "config.json").is_file()
