"""Count the ops that would stall a GPU with a device-to-host sync, on CPU, with a dispatch-mode tracer."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result sizes or values must reach the host: on CUDA each one is a synchronisation.
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select", "repeat_interleave",
               "_unique2", "unique_consecutive", "equal", "is_nonzero", "item")


class SyncCounter(TorchDispatchMode):
    """with SyncCounter() as c: ...; c.count, c.ops: the syncing ops seen (by aten name)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))
