"""The process world of a torchrun launch: rank, size, device, backend and the process groups.

Ranks are laid out expert-major: rank = dp_index * expert + ep_index. An expert-parallel (EP) group is
`expert` consecutive ranks that together hold one copy of every layer's experts (rank ep_index owns
the slice `expert_slice(E, ...)`); the ranks with the same ep_index form that slice's expert-data-parallel
group, over which the slice's gradients are averaged. Every rank reads its own shard of the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from softmoe.train.config import ParallelConfig

__all__ = ["World", "launched_by_torchrun", "init_world", "close_world", "expert_slice"]


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the same variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def expert_slice(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """(first, count) of the experts EP rank `ep_rank` owns: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_experts, ep_size)
    first = ep_rank * base + min(ep_rank, extra)
    return first, base + (ep_rank < extra)


@dataclass(frozen=True)
class World:
    """This process's place in the launch.

    Attributes:
        rank, size: global rank and world size.
        device: the device this rank computes on (cuda:<local_rank> or cpu).
        backend: "nccl" or "gloo".
        ep_size, ep_rank: expert-parallel group size and this rank's index in it.
        ep_group: the ranks sharing one copy of the experts (None when ep_size == 1).
        expert_dp_group: the ranks holding the same expert slice (None when it is this rank alone).
    """

    rank: int
    size: int
    device: torch.device
    backend: str
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = None
    expert_dp_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(config: ParallelConfig) -> World:
    """Join the torchrun process group (env:// rendezvous) and build the expert-parallel groups.

    Raises:
        ValueError: not under torchrun, or parallel.expert not dividing the world size.
    """
    if not launched_by_torchrun():
        raise ValueError(f"parallel.data={config.data!r} needs a torchrun launch (RANK, WORLD_SIZE, MASTER_ADDR, "
                         f"MASTER_PORT unset); run: torchrun --standalone --nproc_per_node=N -m softmoe.train ...")
    cuda = torch.cuda.is_available()
    backend = config.backend if config.backend != "auto" else ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return build_world(config, device, backend)


def build_world(config: ParallelConfig, device: torch.device, backend: str) -> World:
    """The World of an initialised default process group (every rank must call this, in the same order)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    ep = config.expert
    if size % ep:
        raise ValueError(f"parallel.expert={ep} must divide the world size {size}")
    ep_group = expert_dp_group = None
    for start in range(0, size, ep):  # new_group is collective: every rank creates every group
        group = dist.new_group(list(range(start, start + ep))) if ep > 1 else None
        if start <= rank < start + ep:
            ep_group = group
    if size // ep > 1 and ep > 1:
        for index in range(ep):
            group = dist.new_group(list(range(index, size, ep)))
            if rank % ep == index:
                expert_dp_group = group
    return World(rank=rank, size=size, device=device, backend=backend, ep_size=ep, ep_rank=rank % ep,
                 ep_group=ep_group, expert_dp_group=expert_dp_group)


def close_world() -> None:
    """Leave the process group (end of a run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
