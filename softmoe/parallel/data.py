"""Each rank's disjoint, deterministic shard of every global batch.

The global micro-batch i is the single-process run's batch (B rows, a pure function of seed and i);
rank r of n reads rows [r B/n, (r+1) B/n). The shards of all ranks are the whole batch, so the
gradient averaged over ranks is the single-process gradient. Validation is not sharded: every rank
evaluates the same full batches (identical weights give identical numbers, as in one process).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from softmoe.train.data import TrainData

__all__ = ["ShardedData", "shard_rows"]


def shard_rows(batch_size: int, rank: int, size: int) -> slice:
    """Rows of a B-row global batch that rank `rank` of `size` reads.

    Raises:
        ValueError: B not divisible by the number of data-parallel ranks.
    """
    if batch_size % size:
        raise ValueError(f"data.batch_size={batch_size} must be divisible by the {size} data-parallel ranks "
                         f"(each reads an equal shard of the global batch)")
    rows = batch_size // size
    return slice(rank * rows, (rank + 1) * rows)


@dataclass
class ShardedData:
    """TrainData seen by one rank: `train_batch(i)` is its shard of global micro-batch i, on `device`."""

    data: TrainData
    rank: int
    size: int
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        self.rows = shard_rows(self.data.train.batch_size, self.rank, self.size)

    @property
    def train(self):
        return self.data.train

    @property
    def vocab_size(self) -> int:
        return self.data.vocab_size

    @property
    def tokens_per_batch(self) -> int:
        """Tokens of the GLOBAL batch (throughput is reported for the whole job)."""
        return self.data.tokens_per_batch

    def train_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx_BT, targets_BT = self.data.train_batch(index)
        return idx_BT[self.rows].to(self.device), targets_BT[self.rows].to(self.device)

    def val_batches(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((idx.to(self.device), targets.to(self.device)) for idx, targets in self.data.val_batches(count))

    def checkpoint_files(self) -> dict[str, Path]:
        return self.data.checkpoint_files()
