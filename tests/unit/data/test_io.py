"""Output-directory checks (softmoe/data/io.py `unusable_dir`): a file, an uncreatable path and a directory that
cannot be written are named before any work starts.

Run: .venv/bin/python -m pytest -q tests/unit/data/test_io.py
"""

from __future__ import annotations

import tempfile

from softmoe.data import io


def test_an_output_directory_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    assert io.unusable_dir(tmp_path / "new" / "dir") is None and (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("x")
    assert io.unusable_dir(tmp_path / "file") == "is a file, not a directory"
    assert io.unusable_dir(tmp_path / "file" / "below").startswith("cannot create it")

    def read_only(*args, **kwargs):  # a read-only filesystem or an immutable directory (root ignores mode bits)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert io.unusable_dir(tmp_path / "new") == "cannot be written (Read-only file system)"
    assert io.unusable_dir(tmp_path / "new", create=False) is None  # an input directory may be read-only
