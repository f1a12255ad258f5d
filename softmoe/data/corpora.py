"""Documents of a corpus and their deterministic train/val/test split.

The prose split is by document and stratified by source: within each source, documents are
ordered by sha256(f"{seed}:{doc_id}") (stable across runs, machines and Python versions, unlike
`hash()`), the first ones fill `test` up to `test_frac` of the source's characters, the next fill
`val` up to `val_frac`, and the rest are `train`. Each source thus contributes about the same
fraction to every split, and a document never straddles two splits. PTB keeps Mikolov's split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from softmoe.common.checks import check_choice, check_int
from softmoe.data.extract import EXTRACTORS, Document
from softmoe.data.io import atomic_write_text

__all__ = ["SPLITS", "load_source_documents", "split_documents"]

SPLITS = ("train", "val", "test")
# Bump when extraction changes, so cached text from older code is not reused.
EXTRACT_VERSION = 1


def _rank_key(seed: int, doc: Document) -> str:
    return hashlib.sha256(f"{seed}:{doc.doc_id}".encode()).hexdigest()


def _check_fracs(val_frac: float, test_frac: float) -> None:
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name}={frac} must be in [0, 1)")
    if val_frac + test_frac >= 1.0:
        raise ValueError(f"val_frac + test_frac = {val_frac + test_frac} must be < 1")


def _split_one_source(
    docs: list[Document], val_frac: float, test_frac: float, seed: int
) -> dict[str, list[Document]]:
    ranked = sorted(docs, key=lambda d: _rank_key(seed, d))
    total = sum(len(d.text) for d in ranked)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    i = 0
    for split, frac in (("test", test_frac), ("val", val_frac)):
        chars = 0
        # Fill until the target is reached, but always leave at least one document for train.
        while i < len(ranked) - 1 and chars < frac * total:
            out[split].append(ranked[i])
            chars += len(ranked[i].text)
            i += 1
    out["train"] = ranked[i:]
    return out


def split_documents(
    docs: Iterable[Document], val_frac: float = 0.05, test_frac: float = 0.05, seed: int = 0
) -> dict[str, list[Document]]:
    """Split documents into {"train", "val", "test"}, deterministically, stratified by source.

    Args:
        docs: documents with unique doc_id (order does not matter).
        val_frac, test_frac: target fraction of each source's characters for val and test.
        seed: changes which documents are held out.
    Returns:
        {split: documents sorted by (source, doc_id)}; every document lands in exactly one split.
    """
    _check_fracs(val_frac, test_frac)
    check_int("seed", seed, 0)
    by_source: dict[str, list[Document]] = {}
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise ValueError(f"doc_id={doc.doc_id!r} is not unique")
        seen.add(doc.doc_id)
        by_source.setdefault(doc.source, []).append(doc)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for source in sorted(by_source):
        for split, part in _split_one_source(by_source[source], val_frac, test_frac, seed).items():
            out[split].extend(part)
    return {s: sorted(part, key=lambda d: (d.source, d.doc_id)) for s, part in out.items()}


def _write_jsonl(path: Path, docs: list[Document]) -> None:
    rows = ({"source": d.source, "doc_id": d.doc_id, "text": d.text} for d in docs)
    lines = (json.dumps(row, ensure_ascii=False) for row in rows)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _read_jsonl(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def load_source_documents(
    source: str, artifact_path: Path, artifact_sha256: str, text_dir: Path
) -> list[Document]:
    """Documents of one prose source, extracted once and cached as `<text_dir>/<source>-<sha12>-v<N>.jsonl`.

    The cache name carries the artifact hash and EXTRACT_VERSION, so a new artifact or new
    extraction code never reuses stale text.
    """
    check_choice("source", source, sorted(EXTRACTORS))
    cached = Path(text_dir) / f"{source}-{artifact_sha256[:12]}-v{EXTRACT_VERSION}.jsonl"
    if cached.is_file():
        return _read_jsonl(cached)
    docs = [d for d in EXTRACTORS[source](Path(artifact_path)) if d.text]
    if not docs:
        raise ValueError(f"source={source!r}: no documents extracted from {artifact_path}")
    _write_jsonl(cached, docs)
    return docs
