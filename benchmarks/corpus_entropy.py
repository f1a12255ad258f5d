"""Unigram entropy of a prepared corpus's training split: the loss of a model that ignores context.

A language model whose validation loss is not well below this has learned little more than token
frequencies. H = -sum_v p_v ln p_v over the token frequencies p_v of the training split (nats per token;
also in bits). The validation split's cross-entropy under the training unigram is printed too (the loss a
unigram model would score on val, with add-one smoothing for tokens unseen in train).

Run:
    .venv/bin/python benchmarks/corpus_entropy.py                  # the prose corpus, data/prose
    .venv/bin/python benchmarks/corpus_entropy.py --corpus prose --data-dir /path/to/data
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from softmoe.data.config import DataConfig  # noqa: E402
from softmoe.data.prepare import dataset_dir_for, load_split  # noqa: E402


def unigram_entropy(ids: np.ndarray) -> float:
    """-sum p ln p (nats) of the token frequencies of `ids` (1-d integer array)."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train: np.ndarray, other: np.ndarray, vocab: int) -> float:
    """Mean -ln q(token) over `other` under the add-one smoothed unigram q of `train` (nats)."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    q = counts / counts.sum()
    return float(-np.log(q[np.asarray(other, dtype=np.int64)]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="prose")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    directory = dataset_dir_for(DataConfig(corpus=args.corpus, data_dir=args.data_dir))
    train, val = load_split(directory, "train"), load_split(directory, "val")
    vocab = int(max(train.max(), val.max())) + 1
    h = unigram_entropy(train)
    print(f"{args.corpus} ({directory}): train {len(train):,} tokens, {np.count_nonzero(np.bincount(train)):,} "
          f"distinct; unigram entropy {h:.4f} nats/token ({h / math.log(2):.4f} bits); val {len(val):,} tokens, "
          f"cross-entropy under the train unigram {unigram_cross_entropy(train, val, vocab):.4f} nats/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
