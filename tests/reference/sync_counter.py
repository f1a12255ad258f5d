"""Count the ops that would stall a GPU with a device-to-host sync, on CPU, with a dispatch-mode tracer."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result sizes or values must reach the host: on CUDA each one is a synchronisation.
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select", "repeat_interleave",
               "_unique2", "unique_consecutive", "equal", "is_nonzero", "item")
# Tensor methods that copy to the host without an aten op on CPU (on CUDA: a device-to-host copy).
SYNCING_METHODS = ("tolist",)


class _MethodCounter(TorchFunctionMode):
    def __init__(self, ops: list[str]):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class SyncCounter(TorchDispatchMode):
    """with SyncCounter() as c: ...; c.count, c.ops: the syncing ops seen (by aten name, or `tolist`)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self._methods = _MethodCounter(self.ops)

    @property
    def count(self) -> int:
        return len(self.ops)

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._methods.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # repeat_interleave syncs only to size its output; given output_size it does not.
        sized = name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None
        if name in SYNCING_OPS and not sized:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))
