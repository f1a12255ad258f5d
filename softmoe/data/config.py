"""DataConfig: which corpus, where it lives, and how the loader cuts it into windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus={self.corpus!r} must be one of {CORPORA}")
        for name in ("seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
                raise ValueError(f"{name}={value!r} must be an int in [0, 2**63)")
        if self.tokenizer not in _TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r} must be one of {_TOKENIZERS}")
        if self.tokenizer == "word" and self.corpus != "ptb":
            raise ValueError(f"tokenizer='word' needs corpus='ptb', got corpus={self.corpus!r}")
        if self.vocab_size is not None and (
            not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool)
            or not 258 <= self.vocab_size <= 65536
        ):
            raise ValueError(f"vocab_size={self.vocab_size!r} must be None or an int in [258, 65536]")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, Path)):
            raise ValueError(f"data_dir={self.data_dir!r} must be None or a path string")

    @property
    def resolved_data_dir(self) -> Path:
        """The data directory after applying $SOFTMOE_DATA_DIR and the default."""
        return resolve_data_dir(self.data_dir)
