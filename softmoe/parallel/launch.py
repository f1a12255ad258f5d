"""Which trainer a `softmoe train` process runs: the single-process Trainer, or one rank of a torchrun launch."""

from __future__ import annotations

import os

from softmoe.parallel.world import close_world, init_world, launched_by_torchrun
from softmoe.train.config import RunConfig
from softmoe.train.loop import Trainer

__all__ = ["build_trainer", "finish"]


def build_trainer(config: RunConfig) -> Trainer:
    """Trainer for this process: DistributedTrainer when `parallel.data` is ddp/fsdp (under torchrun).

    Raises:
        ValueError: several torchrun processes but parallel.data=none (every one would train the same
            model into the same run directory), or a distributed config outside torchrun.
    """
    if not config.parallel.distributed:
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but parallel.data=none; "
                             f"set parallel.data=ddp or parallel.data=fsdp")
        return Trainer(config)
    from softmoe.parallel.trainer import DistributedTrainer

    try:
        return DistributedTrainer(config, init_world(config.parallel))
    except Exception:  # e.g. parallel.expert not dividing the world size: leave the group, then report
        close_world()
        raise


def finish(trainer: Trainer) -> None:
    """Leave the process group after a distributed run (nothing for one process)."""
    if trainer.config.parallel.distributed:
        close_world()
