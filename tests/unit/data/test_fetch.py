"""Artifact fetching: sha256 verification, caching and offline behaviour, with a fake downloader (no network).

Run: .venv/bin/python -m pytest tests/unit/data/test_fetch.py -q
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from softmoe.data import fetch
from softmoe.data.fetch import ChecksumError, FetchError, fetch_artifact
from softmoe.data.sources import ARTIFACTS, CORPUS_SOURCES, Artifact, artifacts_for

PAYLOAD = b"pretend this is a tarball"


def _artifact(sha: str) -> Artifact:
    return Artifact("fake", "npm", "fake-pkg", "1.0.0", "fake-pkg-1.0.0.tgz", sha, len(PAYLOAD), "none")


def _fake_downloader(payload: bytes, calls: list):
    def download(artifact: Artifact, dest: Path) -> Path:
        calls.append(artifact.name)
        path = dest / artifact.filename
        path.write_bytes(payload)
        return path

    return download


def test_good_download_is_cached_then_served_offline(tmp_path):
    art, calls = _artifact(hashlib.sha256(PAYLOAD).hexdigest()), []
    path = fetch_artifact(art, tmp_path, downloader=_fake_downloader(PAYLOAD, calls))
    assert path == tmp_path / art.filename and path.read_bytes() == PAYLOAD
    # Cache hit: the downloader (the network) is not touched again, even when allowed.
    assert fetch_artifact(art, tmp_path, downloader=_fake_downloader(b"other", calls)) == path
    assert fetch_artifact(art, tmp_path, offline=True) == path
    assert calls == ["fake"]


def test_mismatch_raises_names_artifact_and_hashes_and_keeps_nothing(tmp_path):
    expected = "0" * 64
    art = _artifact(expected)
    with pytest.raises(ChecksumError) as err:
        fetch_artifact(art, tmp_path, downloader=_fake_downloader(PAYLOAD, []))
    msg = str(err.value)
    assert "'fake'" in msg and expected in msg and hashlib.sha256(PAYLOAD).hexdigest() in msg
    assert list(tmp_path.iterdir()) == []  # nothing from the bad download is kept


def test_default_downloader_is_the_patchable_module_function(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch, "download_with_client", _fake_downloader(b"tampered", calls))
    with pytest.raises(ChecksumError, match="expected sha256"):
        fetch.fetch_corpus("ptb", tmp_path)
    assert calls == ["ptb"]
    assert not (tmp_path / "artifacts" / ARTIFACTS["ptb"].filename).exists()


def test_corrupt_cache_is_rejected(tmp_path):
    art = _artifact(hashlib.sha256(PAYLOAD).hexdigest())
    (tmp_path / art.filename).write_bytes(b"bit rot")
    with pytest.raises(ChecksumError, match="corrupt"):
        fetch_artifact(art, tmp_path, downloader=_fake_downloader(PAYLOAD, []))


def test_offline_without_cache_raises(tmp_path):
    with pytest.raises(FetchError, match="softmoe data fetch"):
        fetch_artifact(_artifact("0" * 64), tmp_path, offline=True)


def test_pinned_table_is_complete():
    assert set(CORPUS_SOURCES["prose"]) >= {"sotu", "moby_dick", "brown", "shakespeare", "kjv"}
    for corpus in CORPUS_SOURCES:
        for art in artifacts_for(corpus):
            assert art.version and len(art.sha256) == 64
    with pytest.raises(ValueError, match="corpus='web'"):
        artifacts_for("web")
    with pytest.raises(ValueError, match="client='git'"):
        Artifact("x", "git", "x", "1", "x", "0" * 64, 1, "")
