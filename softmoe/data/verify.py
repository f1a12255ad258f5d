"""Integrity of a prepared dataset directory, checked when a run starts.

- every split file's sha256 equals the one meta.json recorded when the dataset was built, and its token
  ids are below the vocabulary (a zero-filled or edited `train.bin` of the right size, or ids beyond the
  embedding table, are errors naming the file, not a silently wrong run or an IndexError inside torch);
- `tokenizer.json` matches the sha256 in `tokenizer_meta.json` (so a corrupt tokenizer is never copied
  into checkpoints).

Hashing a split costs a full read, so a verified file is remembered in `<dataset>/.verified.json` by
(size, mtime_ns): a later run re-hashes only files that changed on disk. An edit that keeps both the size
and the modification time is not noticed (the cache trades that for a free second start).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from softmoe.data.io import atomic_write_json, read_json, sha256_file

__all__ = ["DataIntegrityError", "verify_dataset", "CACHE"]

CACHE = ".verified.json"


class DataIntegrityError(ValueError):
    """A dataset file differs from what meta.json recorded, or meta.json itself is unreadable."""


def _read(path: Path) -> dict:
    try:
        raw = read_json(path)
    except FileNotFoundError:
        raise DataIntegrityError(f"{path}: missing; prepare the dataset again (`softmoe data fetch`)") from None
    except (OSError, ValueError) as err:
        raise DataIntegrityError(f"{path}: unreadable ({err}); prepare the dataset again") from None
    if not isinstance(raw, dict):
        raise DataIntegrityError(f"{path}: not a JSON object; prepare the dataset again")
    return raw


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def verify_dataset(dataset_dir: Path, splits: tuple[str, ...] = ("train", "val")) -> dict:
    """Check `splits` and the tokenizer of `dataset_dir` against its metadata; return meta.json.

    Raises:
        DataIntegrityError naming the file and what is wrong with it.
    """
    dataset_dir = Path(dataset_dir)
    meta_path = dataset_dir / "meta.json"
    meta = _read(meta_path)
    vocab = meta.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2:
        raise DataIntegrityError(f"{meta_path}: vocab_size={vocab!r} is not a vocabulary size")
    cache_path = dataset_dir / CACHE
    try:
        cache = json.loads(cache_path.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    checked = dict(cache)
    for split in splits:
        entry = (meta.get("splits") or {}).get(split)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise DataIntegrityError(f"{meta_path}: no sha256 for split {split!r}; prepare the dataset again")
        checked[f"{split}.bin"] = _verify_split(dataset_dir / f"{split}.bin", entry["sha256"], vocab,
                                                cache.get(f"{split}.bin"))
    tokenizer = dataset_dir / "tokenizer.json"
    if tokenizer.is_file():
        tok_meta_path = dataset_dir / "tokenizer_meta.json"
        expected = _read(tok_meta_path).get("tokenizer_sha256")
        stamp = {**_stamp(tokenizer), "sha256": expected}
        if cache.get("tokenizer.json") != stamp:
            actual = sha256_file(tokenizer)
            if actual != expected:
                raise DataIntegrityError(f"{tokenizer}: sha256 {actual[:12]}... differs from {tok_meta_path.name}'s "
                                         f"{str(expected)[:12]}...: the tokenizer is corrupt; prepare the dataset again")
        checked["tokenizer.json"] = stamp
    if checked != cache:
        try:
            atomic_write_json(cache_path, checked)
        except OSError:  # a read-only dataset: verify again next time
            pass
    return meta


def _verify_split(path: Path, expected: str, vocab: int, cached: dict | None) -> dict:
    if not path.is_file():
        raise DataIntegrityError(f"{path}: missing; prepare the dataset again")
    stamp = {**_stamp(path), "sha256": expected}
    if cached is not None and {k: cached.get(k) for k in stamp} == stamp and cached.get("max_id", vocab) < vocab:
        return cached
    actual = sha256_file(path)
    if actual != expected:
        raise DataIntegrityError(f"{path}: sha256 {actual[:12]}... differs from meta.json's {expected[:12]}...: "
                                 f"the file was modified or damaged; prepare the dataset again")
    tokens = np.memmap(path, dtype="<u2", mode="r") if stamp["size"] else np.zeros(0, dtype="<u2")
    max_id = int(tokens.max()) if tokens.size else -1
    if max_id >= vocab:
        raise DataIntegrityError(f"{path}: token id {max_id} is outside the vocabulary (meta.json vocab_size={vocab})")
    return {**stamp, "max_id": max_id}
