"""Atomic file writes: write a temp file in the same directory, fsync, then `os.replace`.

A reader never sees a half-written file; an interrupted write leaves at most a stray `.<name>.tmp-*`
file behind, which the next write of the same name removes once it is a day old. Every stage that writes
results (data, train, eval) uses these.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "check_new_folder", "make_temp_dir",
           "write_new_folder"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via temp file + fsync + rename (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _remove_stale_temp(path)


def atomic_write_text(path: Path, text: str) -> None:
    """`text` as UTF-8, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Pretty, key-sorted JSON (so identical content gives identical bytes), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def check_new_folder(out: Path, flag: str = "--out") -> None:
    """ValueError naming `flag` unless `out` is missing or an empty folder (nothing of another folder is
    overwritten). Cheap: call it before the slow work that fills the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {str(out)!r} is an existing file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{flag} {str(out)!r} is not empty ({len(list(out.iterdir()))} entries): write into a new "
                         f"or empty folder")


def make_temp_dir(final: Path) -> Path:
    """A fresh 0755 directory `.<name>.tmp-*` next to `final`, to be filled and then renamed onto it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the folder is meant to be shared
    return tmp


STALE_STAGING_SECONDS = 86400  # a temp file or staging folder untouched this long was left by a killed writer


def _remove_stale_temp(out: Path) -> None:
    """Remove the temp files and staging folders of `out` that killed writers left (`.<name>.tmp-*` next to it,
    unchanged for a day: a writer still filling one changes it far more often). Best effort."""
    if not out.parent.is_dir():
        return
    cutoff = time.time() - STALE_STAGING_SECONDS
    for staging in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        try:
            if staging.lstat().st_mtime >= cutoff:
                continue
            if staging.is_dir() and not staging.is_symlink():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                staging.unlink()
        except OSError:
            pass


def write_new_folder(out: Path, fill: Callable[[Path], None], flag: str = "--out") -> Path:
    """Write folder `out` whole: `fill(staging)` writes into a fresh folder next to it, which is then renamed onto
    `out` (missing or empty, see `check_new_folder`), so `out` is complete or absent; on any error the staging
    folder is removed. Returns `out`."""
    out = Path(out)
    check_new_folder(out, flag)
    _remove_stale_temp(out)
    try:
        staging = make_temp_dir(out)
    except OSError as err:
        raise ValueError(f"{flag} {str(out)!r}: cannot create it ({err.strerror or err})") from None
    try:
        fill(staging)
        if out.is_dir():
            out.rmdir()  # empty (checked above); fails if something was written there meanwhile
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
