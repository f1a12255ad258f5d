"""The code revision a run was trained with: the git commit of the source tree and whether it had local edits.

A study must not mix code revisions (a summary records the revisions of every training session of its run,
and the study report refuses a mix unless told). Installed from a wheel (no git checkout), the commit is None
and the package version is recorded instead.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["code_revision"]


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_revision(root: Path | None = None) -> dict:
    """{"commit": the HEAD commit or None, "dirty": whether tracked files differ from it (None without git),
    "version": softmoe's version} of the checkout holding the softmoe package (or `root`)."""
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    version = _installed_version()
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None, "version": version}
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "softmoe", "configs")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip()), "version": version}


def _installed_version() -> str | None:
    """softmoe's installed version (package metadata), None when it is not installed (a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("softmoe")
    except PackageNotFoundError:
        return None
