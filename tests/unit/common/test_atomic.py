"""Atomic writes (softmoe/common/atomic.py): a folder `out` is complete or absent, a used folder is refused, and the
temp files and staging folders that killed writers left are removed once stale.

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


def test_stale_temp_files_of_killed_file_writers_are_removed(tmp_path):
    """A kill between mkstemp and the rename (e.g. during `softmoe eval`'s eval.json) leaves `.eval.json.tmp-*`;
    the next write of eval.json removes it once a day old, and leaves a fresh one and other names alone."""
    stale, fresh, other = (tmp_path / ".eval.json.tmp-old", tmp_path / ".eval.json.tmp-new",
                           tmp_path / ".eval.md.tmp-old")
    for path in (stale, fresh, other):
        path.write_text("{half")
    old = stale.stat().st_mtime - atomic.STALE_STAGING_SECONDS - 60
    for path in (stale, other):
        os.utime(path, (old, old))
    atomic.atomic_write_json(tmp_path / "eval.json", {"loss": 1.0})
    assert not stale.exists() and fresh.exists() and other.exists()
    assert (tmp_path / "eval.json").read_text() == '{\n  "loss": 1.0\n}\n'
