"""Dataset integrity at run start: split sha256 (cached by size + mtime), token ids < vocab, the tokenizer,
and malformed meta.json, each an error naming the file.

Run: .venv/bin/python -m pytest -q tests/unit/data/test_verify.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from softmoe.data import verify as verify_module
from softmoe.data.fixtures import make_tiny_dataset
from softmoe.data.io import sha256_file
from softmoe.data.verify import CACHE, DataIntegrityError, verify_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def dataset(built, tmp_path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(built, copy)
    (copy / CACHE).unlink(missing_ok=True)
    return copy


def test_a_good_dataset_verifies_once_then_from_the_cache(dataset, monkeypatch):
    meta = verify_dataset(dataset)
    assert meta["vocab_size"] > 0
    cache = json.loads((dataset / CACHE).read_text())
    assert {"train.bin", "val.bin", "tokenizer.json"} <= set(cache)

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(verify_module, "sha256_file", no_hashing)
    verify_dataset(dataset)  # unchanged files: nothing is re-hashed


def test_a_zero_filled_split_of_the_same_size_is_refused(dataset):
    verify_dataset(dataset)  # cached as good ...
    path = dataset / "train.bin"
    path.write_bytes(bytes(path.stat().st_size))  # ... then zero-filled (new mtime)
    with pytest.raises(DataIntegrityError, match=r"train\.bin: sha256 .* differs from meta.json"):
        verify_dataset(dataset)


def test_token_ids_beyond_the_vocabulary_are_refused(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    tokens = np.fromfile(dataset / "val.bin", dtype="<u2")
    tokens[3] = meta["vocab_size"] + 7
    tokens.tofile(dataset / "val.bin")
    meta["splits"]["val"]["sha256"] = sha256_file(dataset / "val.bin")  # consistent metadata, bad ids
    (dataset / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataIntegrityError, match=rf"val\.bin: token id {meta['vocab_size'] + 7} is outside"):
        verify_dataset(dataset)


def test_a_corrupt_tokenizer_is_refused(dataset):
    (dataset / "tokenizer.json").write_text("{ not json")
    with pytest.raises(DataIntegrityError, match=r"tokenizer\.json: sha256 .* the tokenizer is corrupt"):
        verify_dataset(dataset)


@pytest.mark.parametrize("text", ["{ broken", "[]", '{"vocab_size": 384}', '{"vocab_size": "x", "splits": {}}'])
def test_malformed_meta_is_an_error_naming_it(dataset, text):
    (dataset / "meta.json").write_text(text)
    with pytest.raises(DataIntegrityError, match=r"meta\.json"):
        verify_dataset(dataset)
