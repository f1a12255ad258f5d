"""Whole-folder writes (softmoe/common/atomic.py): `out` is complete or absent, a used folder is refused, and the
staging folders that killed writers left are removed once stale.

Run: .venv/bin/python -m pytest -q tests/unit/common/test_atomic.py
"""

from __future__ import annotations

import os

import pytest

from softmoe.common import atomic


def fill(folder):
    (folder / "weights.bin").write_bytes(b"w")


def test_a_folder_is_written_whole_and_a_used_one_refused(tmp_path):
    out = atomic.write_new_folder(tmp_path / "out", fill)
    assert (out / "weights.bin").read_bytes() == b"w" and oct(out.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(ValueError, match="is not empty"):
        atomic.write_new_folder(out, fill)

    def failing(folder):
        fill(folder)
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError):
        atomic.write_new_folder(tmp_path / "other", failing)
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other.tmp-*"))


def test_stale_staging_folders_of_killed_writers_are_removed(tmp_path):
    stale, fresh = tmp_path / ".out.tmp-old", tmp_path / ".out.tmp-new"
    for staging in (stale, fresh):
        staging.mkdir()
        fill(staging)
    old = stale.stat().st_mtime - atomic.STALE_STAGING_SECONDS - 60
    os.utime(stale, (old, old))
    atomic.write_new_folder(tmp_path / "out", fill)
    assert not stale.exists() and fresh.is_dir()  # a writer may still be filling a fresh one
