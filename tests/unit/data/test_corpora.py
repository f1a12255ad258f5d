"""Deterministic document split.

Run: .venv/bin/python -m pytest tests/unit/data/test_corpora.py -q
"""

from __future__ import annotations

import random

import pytest

from softmoe.data.corpora import SPLITS, load_source_documents, split_documents
from softmoe.data.extract import Document


def _docs() -> list[Document]:
    rng = random.Random(1)
    docs = []
    for source, n in (("a", 40), ("b", 25), ("c", 3)):
        docs += [Document(source, f"{source}/{i}", "x" * rng.randint(100, 2000)) for i in range(n)]
    return docs


def _ids(parts):
    return {s: [d.doc_id for d in docs] for s, docs in parts.items()}


def test_split_is_a_partition():
    docs = _docs()
    parts = split_documents(docs, 0.1, 0.1, seed=0)
    ids = [d.doc_id for s in SPLITS for d in parts[s]]
    assert sorted(ids) == sorted(d.doc_id for d in docs)


def test_split_is_deterministic_and_independent_of_input_order():
    docs = _docs()
    shuffled = docs[:]
    random.Random(7).shuffle(shuffled)
    assert _ids(split_documents(docs, seed=3)) == _ids(split_documents(shuffled, seed=3))


def test_split_golden_ids():
    # Pinned so a change of hashing or ordering (which would silently move documents) fails loudly.
    parts = split_documents([Document("s", f"s/{i}", "abc") for i in range(20)], 0.1, 0.1, seed=0)
    assert _ids(parts)["test"] == ["s/19", "s/7"]
    assert _ids(parts)["val"] == ["s/14", "s/18"]


def test_seed_changes_held_out_documents():
    docs = _docs()
    assert _ids(split_documents(docs, seed=0))["test"] != _ids(split_documents(docs, seed=1))["test"]


def test_split_is_stratified_by_source():
    parts = split_documents(_docs(), 0.1, 0.1, seed=0)
    for source in ("a", "b"):
        total = sum(len(d.text) for s in SPLITS for d in parts[s] if d.source == source)
        for split in ("val", "test"):
            chars = sum(len(d.text) for d in parts[split] if d.source == source)
            assert 0.1 * total <= chars <= 0.1 * total + 2000
    assert any(d.source == "c" for d in parts["train"])  # a tiny source still keeps train text


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"val_frac": -0.1}, "val_frac"), ({"test_frac": 1.0}, "test_frac"),
    ({"val_frac": 0.6, "test_frac": 0.5}, "val_frac \\+ test_frac"), ({"seed": -1}, "seed"),
])
def test_split_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        split_documents(_docs(), **kwargs)


def test_split_seed_and_source_name_the_value():
    with pytest.raises(ValueError, match="seed=-1 must be an int >= 0"):
        split_documents(_docs(), seed=-1)
    with pytest.raises(TypeError, match="seed=1.5 must be an int >= 0"):
        split_documents(_docs(), seed=1.5)
    with pytest.raises(ValueError, match="source='nope' must be one of"):
        load_source_documents("nope", "unused", "0" * 64, "unused")


def test_split_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="doc_id"):
        split_documents([Document("a", "a/1", "x"), Document("a", "a/1", "y")])


def test_load_source_documents_caches(tmp_path, monkeypatch):
    from softmoe.data import corpora

    calls = []

    def fake_extract(path):
        calls.append(path)
        return [Document("sotu", "sotu/1", "text é"), Document("sotu", "sotu/2", "")]

    monkeypatch.setitem(corpora.EXTRACTORS, "sotu", fake_extract)
    first = load_source_documents("sotu", tmp_path / "a.tgz", "ab" * 32, tmp_path / "text")
    second = load_source_documents("sotu", tmp_path / "a.tgz", "ab" * 32, tmp_path / "text")
    assert first == second == [Document("sotu", "sotu/1", "text é")]  # empty documents are dropped
    assert len(calls) == 1
