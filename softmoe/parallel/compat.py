"""The torch.distributed calls whose names changed between the torch releases softmoe runs on.

The pinned environment has torch 2.13; the lent GPU machines' image has torch 2.11 (docs/benchmarks.md). 2.13
renamed two things this package uses and deprecated the old names, which 2.11 has alone:
    all_gather_into_tensor -> all_gather_single
    DistributedDataParallel(broadcast_buffers=...) -> forward_sync_buffers=...
Each helper takes the new name where it exists, else the old one (same semantics for what softmoe asks).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["all_gather_flat", "ddp_without_buffer_sync"]


def all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
    """Every rank's `tensor`, concatenated along dim 0 into `output` (world size x its rows), in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def ddp_without_buffer_sync() -> dict:
    """DistributedDataParallel keyword arguments that turn off the buffer broadcast before every forward."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
