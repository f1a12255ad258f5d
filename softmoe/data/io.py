"""File plumbing shared by the data stage: the data directory, sha256, atomic writes, JSON.

Every file the data stage writes goes through `atomic_write_bytes` (softmoe/common/atomic.py, re-exported
here): write a temp file in the same directory, fsync, then `os.replace`, so a reader never sees a
half-written file and an interrupted run leaves at most a stray `.tmp-*` file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from softmoe.common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, make_temp_dir

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialized across processes
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DATA_DIR_ENV",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "build_lock",
    "default_data_dir",
    "make_temp_dir",
    "read_json",
    "resolve_data_dir",
    "sha256_bytes",
    "sha256_file",
    "swap_into_place",
    "unusable_dir",
]

# Environment variable that overrides the default data directory.
DATA_DIR_ENV = "SOFTMOE_DATA_DIR"


def default_data_dir() -> Path:
    """`<repo>/data` for a source checkout (git-ignored), else `./data`."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "data"
    return Path.cwd() / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: the argument if given, else $SOFTMOE_DATA_DIR, else `default_data_dir()`."""
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir={data_dir!r} must be a str or path")
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else default_data_dir()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def swap_into_place(tmp_dir: Path, final: Path) -> None:
    """Replace directory `final` by the finished `tmp_dir` (same parent), then delete the old one."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(tmp_dir, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<parent>/.<name>.lock` while `final` is checked and built.

    Concurrent builders of the same dataset (pytest-xdist workers, two runs) then take turns: the
    second one finds the finished directory and returns, instead of racing the rename.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def unusable_dir(path: str | os.PathLike[str], create: bool = True) -> str | None:
    """Why `path` cannot serve as an output directory (a file; not creatable; not writable), or None when it can.

    With `create`, a missing directory is created (with its parents) and a scratch file written and removed in it
    as the check (a read-only filesystem or an immutable directory fails here, before any work, where permission
    bits alone would not tell for root)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "is a file, not a directory"
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"cannot create it ({err.strerror or err})"
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            return f"cannot be written ({err.strerror or err})"
    return None


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
