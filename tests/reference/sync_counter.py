"""Count the ops that would stall a GPU with a device-to-host sync, on CPU, with a dispatch-mode tracer."""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result sizes or values must reach the host: on CUDA each one is a synchronisation.
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select", "repeat_interleave",
               "_unique2", "unique_consecutive", "equal", "is_nonzero", "item")
# Tensor methods that copy to the host without an aten op on CPU (on CUDA: a device-to-host copy).
SYNCING_METHODS = ("tolist",)


class _MethodCounter(TorchFunctionMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS:
            self.record(name)
        return func(*args, **(kwargs or {}))


class SyncCounter(TorchDispatchMode):
    """with SyncCounter() as c: ...; c.count, c.ops: the syncing ops seen (by aten name, or `tolist`). With
    `stacks=True`, c.stacks[i] is the Python stack (traceback.FrameSummary list) that made c.ops[i]."""

    def __init__(self, stacks: bool = False):
        super().__init__()
        self.ops: list[str] = []
        self.stacks: list[list[traceback.FrameSummary]] = []
        self._keep_stacks = stacks
        self._methods = _MethodCounter(self._record)

    def _record(self, name: str) -> None:
        self.ops.append(name)
        if self._keep_stacks:
            self.stacks.append(traceback.extract_stack())

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
            self._record(name)
        return func(*args, **(kwargs or {}))
