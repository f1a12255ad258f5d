"""The dataset directory format every dataset shares (prepared corpora and the tiny fixture).

Layout of a dataset directory (see prepare.py for how a corpus gets there):

    tokenizer.json, tokenizer_meta.json, train.bin val.bin test.bin (little-endian uint16 token streams),
    splits.json, and meta.json written last (so a directory with meta.json is complete).

`write_dataset` writes it, `build_atomically` builds it under a temporary name and renames it into place,
`is_prepared`, `read_meta` and `load_split` read it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from softmoe.common.checks import check_choice
from softmoe.data.corpora import SPLITS
from softmoe.data.io import (
    atomic_write_bytes,
    atomic_write_json,
    make_temp_dir,
    read_json,
    sha256_bytes,
    swap_into_place,
)
from softmoe.data.tokenizer import encode_documents, save_tokenizer, text_sha256

__all__ = ["FORMAT_VERSION", "TOKEN_DTYPE", "build_atomically", "is_prepared", "load_split", "read_meta",
           "write_dataset"]

FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u2")


def write_dataset(
    out_dir: Path,
    tok: Tokenizer,
    kind: str,
    sep_token: str,
    texts: dict[str, Sequence[str]],
    extra_meta: dict,
) -> dict:
    """Encode every split with `tok` and write the dataset files into `out_dir` (meta.json last).

    Args:
        texts: {"train"|"val"|"test": documents}; the tokenizer must have been trained on texts["train"].
        extra_meta: merged into meta.json (corpus, sources, split, recipe hash, ...).
    Returns:
        The meta dict written to meta.json.
    """
    train_sha = text_sha256(texts["train"])
    tok_meta = save_tokenizer(tok, out_dir, kind=kind, sep_token=sep_token, train_sha256=train_sha)
    splits = {}
    for split in SPLITS:
        tokens = encode_documents(tok, texts[split], tok_meta["sep_id"]).astype(TOKEN_DTYPE, copy=False)
        data = tokens.tobytes()
        atomic_write_bytes(Path(out_dir) / f"{split}.bin", data)
        splits[split] = {
            "documents": len(texts[split]),
            "chars": sum(len(t) for t in texts[split]),
            "bytes": sum(len(t.encode("utf-8")) for t in texts[split]),
            "tokens": int(tokens.shape[0]),
            "sha256": sha256_bytes(data),
        }
    meta = {"dtype": "uint16", "vocab_size": tok_meta["vocab_size"], "sep_id": tok_meta["sep_id"],
            "sep_token": sep_token, "tokenizer": tok_meta, "splits": splits, **extra_meta}
    atomic_write_json(Path(out_dir) / "meta.json", meta)
    return meta


def is_prepared(dataset_dir: Path, recipe_sha256: str) -> bool:
    """True if `dataset_dir` is complete (meta.json is written last) and built from this recipe."""
    meta_path = Path(dataset_dir) / "meta.json"
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):  # missing or damaged: build it again
        return False
    return isinstance(meta, dict) and meta.get("recipe_sha256") == recipe_sha256


def build_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """Run `fill(tmp_dir)` on a fresh temp dir next to `final`, then rename it onto `final`.

    On any error the temp dir is removed and `final` is left as it was.
    """
    tmp_dir = make_temp_dir(final)
    try:
        fill(tmp_dir)
        swap_into_place(tmp_dir, final)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def read_meta(dataset_dir: Path) -> dict:
    """meta.json of a dataset directory (FileNotFoundError with a hint if it is not prepared)."""
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset_dir={str(dataset_dir)!r} has no meta.json; run `softmoe data fetch`"
        )
    try:
        meta = read_json(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); prepare the dataset again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object; prepare the dataset again")
    return meta


def load_split(dataset_dir: Path, split: str) -> np.memmap:
    """Read-only memmap of one split's tokens.

    Returns:
        (N,) uint16 np.memmap; N matches meta.json's token count.
    """
    check_choice("split", split, SPLITS)
    meta = read_meta(dataset_dir)
    path = Path(dataset_dir) / f"{split}.bin"
    try:
        expected = int(meta["splits"][split]["tokens"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{Path(dataset_dir) / 'meta.json'}: no token count for split {split!r}; "
                         f"prepare the dataset again") from None
    size = path.stat().st_size if path.is_file() else -1
    if size != expected * TOKEN_DTYPE.itemsize:
        raise ValueError(f"{path}: {size} bytes, meta.json says {expected} uint16 tokens")
    if expected == 0:
        raise ValueError(f"{path}: split {split!r} is empty")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(expected,))
