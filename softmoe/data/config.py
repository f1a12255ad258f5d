"""DataConfig: which corpus, where it lives, and how the loader cuts it into windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from softmoe.common.checks import check_choice, check_int
from softmoe.data.io import resolve_data_dir

__all__ = ["CORPORA", "DataConfig"]

# "tiny" is the embedded fixture (no network, < 2 s); the others come from `softmoe data fetch`.
CORPORA = ("tiny", "prose", "ptb")
_TOKENIZERS = (None, "bpe", "word")


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "tiny"  # one of CORPORA
    data_dir: str | None = None  # None: $SOFTMOE_DATA_DIR, else <repo>/data
    seq_len: int = 256  # tokens per training window (T)
    batch_size: int = 16  # windows per batch (B)
    seed: int = 0  # window sampling seed; batch(step) is a pure function of (seed, step)
    tokenizer: str | None = None  # None: corpus default ("bpe"; "word" for ptb)
    vocab_size: int | None = None  # BPE vocabulary; None: corpus default (8192; fixture 384)
    split_seed: int = 0  # which documents are held out for val/test (prose)

    def __post_init__(self) -> None:
        check_choice("corpus", self.corpus, CORPORA)
        for name in ("seq_len", "batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("seed", "split_seed"):
            check_int(name, getattr(self, name), 0, 2**63 - 1)
        check_choice("tokenizer", self.tokenizer, _TOKENIZERS)
        if self.tokenizer == "word" and self.corpus != "ptb":
            raise ValueError(f"tokenizer='word' needs corpus='ptb', got corpus={self.corpus!r}")
        check_int("vocab_size", self.vocab_size, 258, 65536, allow_none=True)
        if self.data_dir is not None and not isinstance(self.data_dir, (str, Path)):
            raise ValueError(f"data_dir={self.data_dir!r} must be None or a path string")

    @property
    def resolved_data_dir(self) -> Path:
        """The data directory after applying $SOFTMOE_DATA_DIR and the default."""
        return resolve_data_dir(self.data_dir)
