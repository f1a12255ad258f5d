"""Devices and mixed precision: which device a run computes on, and autocast on that device.

`resolve_device("auto")` is CUDA when available, else the CPU; an explicit "cpu", "cuda" or "cuda:N" is
checked (a clear ValueError when CUDA is asked for and missing). `autocast_context(precision, device)`
is bf16 autocast on the device's type for "bf16" and nothing for "fp32"; the routers keep their gate
and soft top-k in fp32 inside it (routing/base.py `router_logits`). Imports nothing from softmoe.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "DEVICES", "resolve_device", "check_device_name", "autocast_context", "module_device"]

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")  # plus "cuda:<index>"


def check_device_name(name, field: str = "device") -> str:
    """`name` if it is "auto", "cpu", "cuda" or "cuda:<index>"; else ValueError naming `field` and the value."""
    if isinstance(name, str):
        base, sep, index = name.partition(":")
        if (not sep and base in DEVICES) or (base == "cuda" and sep and index.isdigit()):
            return name
    raise ValueError(f"{field}={name!r} must be one of {list(DEVICES)} or 'cuda:<index>'")


def resolve_device(name: str = "auto", field: str = "device") -> torch.device:
    """The torch.device for `name` ("auto": CUDA when available, else CPU).

    Raises:
        ValueError: an unknown name, or CUDA asked for on a machine without it (naming `field`).
    """
    check_device_name(name, field)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}={name!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast_context(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast on `device`'s type for precision "bf16"; a no-op context for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
