"""The training loop's view of the data stage: train/val batches by index, vocab size, tokenizer files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from softmoe.data import WindowLoader, dataset_dir_for, load_split
from softmoe.data.config import DataConfig
from softmoe.data.verify import verify_dataset

__all__ = ["TrainData", "open_data", "VAL_SEED_OFFSET", "val_seed"]

# The validation windows use their own seed so they never coincide with a training step's windows.
VAL_SEED_OFFSET = 1_000_003


def val_seed(seed: int) -> int:
    """The validation loader's seed for data.seed = `seed`: offset, wrapped into [0, 2**63) so every valid
    data.seed (up to 2**63 - 1) has one."""
    return (seed + VAL_SEED_OFFSET) % 2**63


@dataclass
class TrainData:
    """Batches are pure functions of their index: `train_batch(i)` is micro-batch i of the run."""

    dataset_dir: Path
    vocab_size: int
    train: WindowLoader
    val: WindowLoader
    tokens_per_batch: int

    def train_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _as_long(self.train.batch(index))

    def val_batches(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same `count` validation batches every time (windows drawn from the val split)."""
        return (_as_long(self.val.batch(i)) for i in range(count))

    def checkpoint_files(self) -> dict[str, Path]:
        """Tokenizer files copied into every checkpoint so it can be used on its own."""
        names = ("tokenizer.json", "tokenizer_meta.json")
        return {name: self.dataset_dir / name for name in names if (self.dataset_dir / name).is_file()}


def _as_long(pair) -> tuple[torch.Tensor, torch.Tensor]:
    idx, targets = pair
    return torch.as_tensor(idx).long(), torch.as_tensor(targets).long()


def open_data(config: DataConfig) -> TrainData:
    """Locate (never download) and verify the dataset of `config`, and build its train and val loaders."""
    dataset_dir = dataset_dir_for(config)
    meta = verify_dataset(dataset_dir)  # sha256 of the splits and the tokenizer, token ids < vocab (cached)
    train = WindowLoader(load_split(dataset_dir, "train"), config.seq_len, config.batch_size, config.seed)
    val = WindowLoader(load_split(dataset_dir, "val"), config.seq_len, config.batch_size,
                       val_seed(config.seed))
    return TrainData(dataset_dir=dataset_dir, vocab_size=int(meta["vocab_size"]), train=train, val=val,
                     tokens_per_batch=config.seq_len * config.batch_size)
