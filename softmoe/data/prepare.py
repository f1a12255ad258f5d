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
from pathlib import Path

from tokenizers import Tokenizer

from softmoe.data.config import DataConfig
from softmoe.data.corpora import load_source_documents, split_documents
from softmoe.data.extract import extract_ptb
from softmoe.data.fetch import fetch_corpus
from softmoe.data.fixtures import make_tiny_dataset
from softmoe.data.io import atomic_write_json, build_lock, resolve_data_dir, sha256_bytes
from softmoe.data.layout import (
    FORMAT_VERSION,
    TOKEN_DTYPE,
    build_atomically,
    is_prepared,
    load_split,
    read_meta,
    write_dataset,
)
from softmoe.data.sources import artifacts_for
from softmoe.data.tokenizer import EOS, EOT, build_word_level, check_bpe_vocab, train_bpe

__all__ = [
    "FORMAT_VERSION",
    "TOKEN_DTYPE",
    "build_atomically",
    "dataset_dir_for",
    "is_prepared",
    "load_split",
    "prepare",
    "read_meta",
    "resolve_tokenizer",
    "write_dataset",
]

DEFAULT_VOCAB = 8192


def resolve_tokenizer(
    corpus: str, tokenizer: str | None, vocab_size: int | None
) -> tuple[str, int | None, str]:
    """(kind, vocab_size or None for word level, dataset directory name); ValueError for a request that cannot
    be built (checked before anything is fetched)."""
    if corpus not in ("prose", "ptb"):
        raise ValueError(f"corpus={corpus!r} must be 'prose' or 'ptb' ('tiny' is built by fixtures)")
    kind = tokenizer or ("word" if corpus == "ptb" else "bpe")
    if kind not in ("bpe", "word") or (kind == "word" and corpus != "ptb"):
        raise ValueError(f"tokenizer={tokenizer!r} is not valid for corpus={corpus!r}")
    if kind == "word":
        if vocab_size is not None:
            raise ValueError(f"vocab_size={vocab_size} cannot be set for ptb: its vocabulary is the corpus's own "
                             f"10k words (leave vocab_size unset, or drop --vocab-size)")
        return kind, None, corpus
    vocab = DEFAULT_VOCAB if vocab_size is None else vocab_size
    check_bpe_vocab(vocab)
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
    kind, vocab, name = resolve_tokenizer(corpus, tokenizer, vocab_size)
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
    from softmoe.common.progress import progress_bar

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


def dataset_dir_for(cfg: DataConfig) -> Path:
    """The dataset directory of a DataConfig, without any network access.

    "tiny" is (re)built from the embedded fixture; "prose"/"ptb" must have been fetched once
    (`softmoe data fetch`); they are re-prepared from cached artifacts if needed, never downloaded.
    """
    root = cfg.resolved_data_dir
    if cfg.corpus == "tiny":
        kwargs = {} if cfg.vocab_size is None else {"vocab_size": cfg.vocab_size}
        return make_tiny_dataset(root / "tiny", **kwargs)
    return prepare(cfg.corpus, root, offline=True, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                   split_seed=cfg.split_seed)
