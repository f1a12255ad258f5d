"""Tokenizers: byte-level BPE (HF `tokenizers`) for prose, and PTB's own 10k word vocabulary.

Both are trained on the train split only and saved as `tokenizer.json` next to
`tokenizer_meta.json`, which records the kind, vocabulary size, the document separator id and the
sha256 of the exact training text (each training text's UTF-8 bytes followed by one NUL byte).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from softmoe.data.io import atomic_write_json, atomic_write_text, read_json, sha256_file

__all__ = [
    "EOS",
    "EOT",
    "build_word_level",
    "check_bpe_vocab",
    "encode_documents",
    "load_tokenizer",
    "load_tokenizer_meta",
    "save_tokenizer",
    "text_sha256",
    "train_bpe",
]

EOT = "<|endoftext|>"  # BPE document separator, id 0
EOS = "<eos>"  # PTB sentence end (part of its standard 10k vocabulary)
UNK = "<unk>"
MAX_VOCAB = 1 << 16  # token files are uint16


def text_sha256(texts: Iterable[str]) -> str:
    """sha256 over each text's UTF-8 bytes followed by a NUL byte (the tokenizer's training text)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def check_bpe_vocab(vocab_size: int) -> None:
    """ValueError unless `vocab_size` is a byte-level BPE vocabulary `train_bpe` can build: [258, MAX_VOCAB]
    (the 256 bytes, EOT, and at least one merge)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 258 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int in [258, {MAX_VOCAB}]")


def train_bpe(texts: Sequence[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE with EOT as special token 0; all 256 bytes are in the base alphabet.

    Args:
        texts: training documents (the train split only).
        vocab_size: final vocabulary including the 256 byte tokens and EOT; in [258, 65536].
    """
    check_bpe_vocab(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def build_word_level(train_lines: Iterable[str]) -> Tokenizer:
    """PTB's word vocabulary: every whitespace token of the train split plus EOS.

    Ids are ordered by descending train frequency, ties alphabetically (deterministic); words not
    in the vocabulary map to <unk>, which PTB already uses. On Mikolov's split this is 10,000 words.
    """
    counts = Counter()
    for line in train_lines:
        words = line.split()
        if words:
            counts.update(words)
            counts[EOS] += 1
    if UNK not in counts:
        counts[UNK] = 0
    ordered = sorted(counts, key=lambda w: (-counts[w], w))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(ordered)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def encode_documents(tok: Tokenizer, texts: Sequence[str], sep_id: int) -> np.ndarray:
    """Encode documents and concatenate them, each followed by `sep_id`.

    Returns:
        (sum_d len(tokens_d) + 1,) uint16 token stream.
    """
    if tok.get_vocab_size() > MAX_VOCAB:
        raise ValueError(f"vocab size {tok.get_vocab_size()} does not fit uint16 token files")
    parts = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.asarray([sep_id], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def save_tokenizer(tok: Tokenizer, out_dir: Path, *, kind: str, sep_token: str, train_sha256: str) -> dict:
    """Write `tokenizer.json` and `tokenizer_meta.json` atomically; return the meta dict."""
    path = Path(out_dir) / "tokenizer.json"
    atomic_write_text(path, tok.to_str())
    meta = {
        "kind": kind,
        "vocab_size": tok.get_vocab_size(),
        "sep_token": sep_token,
        "sep_id": tok.token_to_id(sep_token),
        "train_text_sha256": train_sha256,
        "tokenizer_sha256": sha256_file(path),
        "tokenizers_version": tokenizers.__version__,
    }
    atomic_write_json(Path(out_dir) / "tokenizer_meta.json", meta)
    return meta


def load_tokenizer_meta(dataset_dir: Path) -> dict:
    return read_json(Path(dataset_dir) / "tokenizer_meta.json")


def load_tokenizer(dataset_dir: Path) -> Tokenizer:
    """The dataset's `tokenizers.Tokenizer`, after checking tokenizer.json against its recorded hash."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset_dir={str(dataset_dir)!r} has no tokenizer.json (run `softmoe data fetch`)"
        )
    expected = load_tokenizer_meta(dataset_dir)["tokenizer_sha256"]
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"{path}: sha256 {actual} differs from tokenizer_meta.json's {expected}")
    return Tokenizer.from_file(str(path))
