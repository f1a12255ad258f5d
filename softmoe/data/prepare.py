"""Prepare = fetch + extract + split + tokenizer + encode, into one dataset directory.

Layout of `<data_dir>/<name>/` (name is the corpus, e.g. "prose", or "prose-bpe4096" for a
non-default tokenizer):

    tokenizer.json         HF tokenizers file
    tokenizer_meta.json    kind, vocab size, separator id, sha256 of training text and of tokenizer.json
    train.bin val.bin test.bin   little-endian uint16 token streams; every document ends with the separator
    splits.json            document ids of each split
    meta.json              written last: vocab size, per-split documents/chars/bytes/tokens/sha256,
                           source versions and hashes, split settings, recipe hash

The directory is built under a temporary name and renamed into place, so it is either complete or
absent. `prepare` is idempotent: if meta.json records the same recipe, it returns at once without
touching the network; with `offline=True` it never downloads (cached artifacts are enough).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from softmoe.data.config import DataConfig
from softmoe.data.corpora import SPLITS, load_source_documents, split_documents
from softmoe.data.extract import extract_ptb
from softmoe.data.fetch import fetch_corpus
from softmoe.data.io import (
    atomic_write_bytes,
    atomic_write_json,
    build_lock,
    make_temp_dir,
    read_json,
    resolve_data_dir,
    sha256_bytes,
    swap_into_place,
)
from softmoe.data.sources import artifacts_for
from softmoe.data.tokenizer import (
    EOS,
    EOT,
    build_word_level,
    encode_documents,
    save_tokenizer,
    text_sha256,
    train_bpe,
)

__all__ = [
    "TOKEN_DTYPE",
    "build_atomically",
    "dataset_dir_for",
    "is_prepared",
    "load_split",
    "prepare",
    "read_meta",
    "write_dataset",
]

FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u2")
DEFAULT_VOCAB = 8192


def _resolve_tokenizer(
    corpus: str, tokenizer: str | None, vocab_size: int | None
) -> tuple[str, int | None, str]:
    """(kind, vocab_size or None for word level, dataset directory name)."""
    if corpus not in ("prose", "ptb"):
        raise ValueError(f"corpus={corpus!r} must be 'prose' or 'ptb' ('tiny' is built by fixtures)")
    kind = tokenizer or ("word" if corpus == "ptb" else "bpe")
    if kind not in ("bpe", "word") or (kind == "word" and corpus != "ptb"):
        raise ValueError(f"tokenizer={tokenizer!r} is not valid for corpus={corpus!r}")
    if kind == "word":
        if vocab_size is not None:
            raise ValueError(f"vocab_size={vocab_size} is fixed by PTB's word vocabulary; pass None")
        return kind, None, corpus
    vocab = DEFAULT_VOCAB if vocab_size is None else vocab_size
    default = tokenizer is None and vocab == DEFAULT_VOCAB
    return kind, vocab, corpus if default else f"{corpus}-bpe{vocab}"


def _recipe(corpus: str, kind: str, vocab: int | None, split: dict) -> dict:
    sources = [
        {"name": a.name, "client": a.client, "package": a.package, "version": a.version,
         "filename": a.filename, "sha256": a.sha256, "size": a.size, "licence": a.licence}
        for a in artifacts_for(corpus)
    ]
    return {"format": FORMAT_VERSION, "corpus": corpus, "tokenizer": kind, "vocab_size": vocab,
            "split": split, "sources": sources}


def _recipe_sha(recipe: dict) -> str:
    return sha256_bytes(json.dumps(recipe, sort_keys=True).encode())


def _prose_splits(paths: dict[str, Path], data_dir: Path, split: dict) -> tuple[dict[str, list[str]], dict]:
    docs = []
    for a in artifacts_for("prose"):
        docs += load_source_documents(a.name, paths[a.name], a.sha256, data_dir / "text")
    parts = split_documents(docs, split["val_frac"], split["test_frac"], split["seed"])
    ids = {s: [d.doc_id for d in part] for s, part in parts.items()}
    return {s: [d.text for d in part] for s, part in parts.items()}, ids


def _ptb_splits(paths: dict[str, Path]) -> tuple[dict[str, list[str]], dict]:
    # A "document" of PTB is one sentence (line); the split is Mikolov's.
    raw = extract_ptb(paths["ptb"])
    texts = {s: [line.strip() for line in t.split("\n") if line.strip()] for s, t in raw.items()}
    return texts, {"note": "Mikolov's PTB split; documents are sentences (lines)"}


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


def prepare(
    corpus: str,
    data_dir: Path | None = None,
    *,
    offline: bool = False,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    split_seed: int = 0,
    val_frac: float = 0.05,
    test_frac: float = 0.05,
    progress: bool = False,
) -> Path:
    """Build (or find) the tokenized dataset of `corpus` and return its directory.

    Args:
        corpus: "prose" or "ptb".
        data_dir: root of artifacts/, text/ and dataset dirs; None -> $SOFTMOE_DATA_DIR or <repo>/data.
        offline: never use the network; missing artifacts raise FetchError.
        tokenizer: "bpe" or "word" (ptb only); None -> "bpe" for prose, "word" for ptb.
        vocab_size: BPE vocabulary (default 8192).
        split_seed, val_frac, test_frac: the prose document split (ignored by ptb).
        progress: a bar over the build's phases (download, split, tokenizer, encode) on a terminal.
    Returns:
        Path of the dataset directory `<data_dir>/<name>`.
    """
    kind, vocab, name = _resolve_tokenizer(corpus, tokenizer, vocab_size)
    root = resolve_data_dir(data_dir)
    if corpus == "ptb":
        split = {"method": "mikolov"}
    else:
        split = {"method": "sha256-rank-by-source", "seed": split_seed,
                 "val_frac": val_frac, "test_frac": test_frac}
    recipe = _recipe(corpus, kind, vocab, split)
    final = root / name
    if is_prepared(final, _recipe_sha(recipe)):
        return final  # already prepared with this exact recipe: no network, no work
    with build_lock(final):
        if not is_prepared(final, _recipe_sha(recipe)):  # another process may have just built it
            _build(final, recipe, kind, vocab, offline, progress)
    return final


def _build(final: Path, recipe: dict, kind: str, vocab: int | None, offline: bool, progress: bool = False) -> None:
    from softmoe.progress import progress_bar

    corpus, root, split = recipe["corpus"], final.parent, recipe["split"]
    bar = progress_bar(4, f"{corpus}: download", progress, unit="phase")
    paths = fetch_corpus(corpus, root, offline=offline)
    bar.update(1)
    bar.set_description(f"{corpus}: extract and split")
    texts, ids = _ptb_splits(paths) if corpus == "ptb" else _prose_splits(paths, root, split)
    bar.update(1)
    bar.set_description(f"{corpus}: tokenizer")
    tok = build_word_level(texts["train"]) if kind == "word" else train_bpe(texts["train"], vocab)
    bar.update(1)
    bar.set_description(f"{corpus}: encode")
    extra = {"format": FORMAT_VERSION, "name": final.name, "corpus": corpus, "unit": kind,
             "sources": recipe["sources"], "split": split, "recipe_sha256": _recipe_sha(recipe)}
    build_atomically(final, lambda tmp: _fill(tmp, tok, kind, texts, ids, extra))
    bar.update(1)
    bar.close()


def _fill(tmp_dir: Path, tok: Tokenizer, kind: str, texts: dict, ids: dict, extra: dict) -> None:
    atomic_write_json(tmp_dir / "splits.json", ids)
    write_dataset(tmp_dir, tok, kind, EOS if kind == "word" else EOT, texts, extra)


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
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
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


def dataset_dir_for(cfg: DataConfig) -> Path:
    """The dataset directory of a DataConfig, without any network access.

    "tiny" is (re)built from the embedded fixture; "prose"/"ptb" must have been fetched once
    (`softmoe data fetch`); they are re-prepared from cached artifacts if needed, never downloaded.
    """
    root = cfg.resolved_data_dir
    if cfg.corpus == "tiny":
        from softmoe.data.fixtures import make_tiny_dataset

        kwargs = {} if cfg.vocab_size is None else {"vocab_size": cfg.vocab_size}
        return make_tiny_dataset(root / "tiny", **kwargs)
    return prepare(cfg.corpus, root, offline=True, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                   split_seed=cfg.split_seed)
