"""The one switch for value checks that need a device-to-host sync.

Shape and type checks are free and always run. Checks that read tensor values (finiteness, a k or
alpha range given as a tensor) cost one host sync each: free on CPU, a pipeline stall on a GPU. The
environment variable `SOFTMOE_CHECKS` decides, read at call time (no global state):

    auto  (default) on for CPU tensors, off for accelerator tensors
    on    always check (debugging on a GPU)
    off   never check (e.g. counting syncs on CPU); degenerate inputs then give finite, clamped results

Under torch.compile tracing value checks are off: a traced graph cannot raise on data.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["CHECK_MODES", "all_finite", "value_checks_enabled"]

CHECK_MODES = ("auto", "on", "off")


def value_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether value checks (which sync) run for a computation on `tensor`'s device."""
    mode = os.environ.get("SOFTMOE_CHECKS", "auto").strip().lower()
    if mode not in CHECK_MODES:
        raise ValueError(f"SOFTMOE_CHECKS={mode!r} must be one of {CHECK_MODES}")
    if torch.compiler.is_compiling():
        return False
    if mode == "auto":
        return tensor.device.type == "cpu"
    return mode == "on"


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of `tensor` is finite (a value check: one host read). A finite sum proves every entry
    finite in one reduction; only a non-finite sum (a NaN/inf entry, or finite entries whose sum overflows) takes
    the exact, entrywise check."""
    return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())
