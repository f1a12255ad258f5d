"""The expert bank: E SwiGLU experts as stacked 3-D weights, with interchangeable implementations.

Shape legend:
    N   routed (token, expert) pairs, sorted by expert
    E   experts
    D   d_model
    H   d_hidden (one expert's hidden width)

Rows of x_ND are grouped by expert: expert e owns rows offsets[e]:offsets[e+1] (from counts_E).
Implementations (`EXPERT_IMPLS`, chosen by name):
    loop     the spec and test oracle: a Python loop over non-empty experts, plain matmuls.
    grouped  one grouped matmul per projection over the ragged segments
             (`torch.nn.functional.grouped_mm`), no host sync; falls back to `loop` when the
             build has no grouped matmul for this device, dtype or shape. On CPU (torch 2.13)
             grouped_mm runs one matmul per expert internally, so it is only as fast as those.
    padded   (default) segments padded to a common capacity and run as batched matmuls (bmm), the
             few rows of overloaded experts past the capacity run grouped. Measured 1.2-2.6x faster
             than `grouped` on CPU at E = 8..64 (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ExpertBank",
    "EXPERT_IMPLS",
    "swiglu",
    "loop_experts",
    "grouped_experts",
    "padded_experts",
    "grouped_mm_supported",
]

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EXPERT_IMPLS: dict[str, ExpertsFn] = {}


def _register(name: str) -> Callable[[ExpertsFn], ExpertsFn]:
    def wrap(fn: ExpertsFn) -> ExpertsFn:
        EXPERT_IMPLS[name] = fn
        return fn

    return wrap


def swiglu(x_ND: torch.Tensor, w_gate_DH: torch.Tensor, w_up_DH: torch.Tensor, w_down_HD: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: (silu(x W_gate) * (x W_up)) W_down, (N, D) -> (N, D)."""
    return (F.silu(x_ND @ w_gate_DH) * (x_ND @ w_up_DH)) @ w_down_HD


@_register("loop")
def loop_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD) -> torch.Tensor:
    """Reference: run each non-empty expert on its contiguous slice of rows.

    Args:
        x_ND: (N, D) rows sorted by expert.
        counts_E: (E,) int64 rows per expert (zeros allowed).
        w_gate_EDH, w_up_EDH: (E, D, H); w_down_EHD: (E, H, D).
    Returns:
        y_ND: (N, D), row i computed by the expert that owns it.
    """
    outputs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):  # one host sync: slice bounds must be Python ints
        if n:
            outputs.append(swiglu(x_ND[start:start + n], w_gate_EDH[e], w_up_EDH[e], w_down_EHD[e]))
        start += n
    if not outputs:  # no rows: an empty product keeps the result attached to the graph
        return swiglu(x_ND, w_gate_EDH[0], w_up_EDH[0], w_down_EHD[0])
    return torch.cat(outputs)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype inside autocast, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype): does grouped_mm run forward and backward and match a loop?"""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        # Deterministic data: the probe must not consume the global RNG.
        x = torch.linspace(-1, 1, 48, device=device_type).reshape(6, 8).to(dtype).requires_grad_()
        w = torch.linspace(-1, 1, 192, device=device_type).reshape(3, 8, 8).cos().to(dtype).requires_grad_()
        offs = torch.tensor([2, 2, 6], dtype=torch.int32, device=device_type)
        y = F.grouped_mm(x, w, offs=offs)
        y.float().square().sum().backward()
        ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
        return bool(torch.allclose(y.float(), ref.float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, d_model: int, d_hidden: int) -> bool:
    """Whether `grouped` can run natively: a working grouped_mm and 16-byte-aligned row strides."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    aligned = (d_model * itemsize) % 16 == 0 and (d_hidden * itemsize) % 16 == 0
    return aligned and _grouped_mm_works(device.type, dtype)


@_register("grouped")
def grouped_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD) -> torch.Tensor:
    """Grouped matmuls over the ragged expert segments; same contract as `loop_experts`."""
    dtype = _compute_dtype(x_ND)
    if not grouped_mm_supported(x_ND.device, dtype, x_ND.shape[-1], w_gate_EDH.shape[-1]):
        return loop_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD)
    # grouped_mm is not on autocast's cast list, so cast explicitly to what autocast would use.
    offs_E = counts_E.cumsum(0).to(torch.int32)
    x = x_ND.to(dtype)
    gate_NH = F.grouped_mm(x, w_gate_EDH.to(dtype), offs=offs_E)
    up_NH = F.grouped_mm(x, w_up_EDH.to(dtype), offs=offs_E)
    return F.grouped_mm(F.silu(gate_NH) * up_NH, w_down_EHD.to(dtype), offs=offs_E)


def _padded_capacity(counts: list[int], overflow_cost: float = 4.0, call_cost: float = 64.0) -> int:
    """Rows per expert in the padded batch, from a cost model in units of one padded row.

    A padded row costs 1 (the batch is E x C rows); a row past C runs in a small per-expert matmul,
    measured 4-5x slower per row on CPU, plus a fixed cost per overflowing expert. C is the count
    that minimises E * C + overflow_cost * overflow_rows + call_cost * overflowing_experts.
    """
    num_experts = len(counts)

    def cost(cap: int) -> float:
        over = [n - cap for n in counts if n > cap]
        return num_experts * cap + overflow_cost * sum(over) + call_cost * len(over)

    return max(1, min(set(counts), key=cost))


@_register("padded")
def padded_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD) -> torch.Tensor:
    """Batched matmuls over expert segments padded to a common capacity, ragged overflow grouped.

    Expert e's first min(count_e, C) rows go to slot e of an (E, C, D) batch (zeros elsewhere) and
    run as three `bmm`s; rows beyond C (overloaded experts only) run through `grouped_experts`.
    Nothing is dropped. On CPU a bmm parallelises over experts and keeps every core on a large
    matmul, where per-expert matmuls of a few hundred rows run at a fraction of the rate. C trades
    padding against overflow (`_padded_capacity`). Same contract as `loop_experts`.
    """
    counts = counts_E.tolist()  # one host sync: the padded shape must be known
    num_rows, num_experts = x_ND.shape[0], len(counts)
    if num_rows == 0:
        return loop_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD)
    cap = _padded_capacity(counts)
    dtype = _compute_dtype(x_ND)
    offsets_E = counts_E.cumsum(0) - counts_E
    expert_N = torch.repeat_interleave(torch.arange(num_experts, device=x_ND.device), counts_E, output_size=num_rows)
    pos_N = torch.arange(num_rows, device=x_ND.device) - offsets_E[expert_N]
    # Overflow rows are parked in one spare slot past the batch; it is never read back.
    slot_N = torch.where(pos_N < cap, expert_N * cap + pos_N, num_experts * cap)
    x_PD = x_ND.new_zeros(num_experts * cap + 1, x_ND.shape[-1], dtype=dtype).index_copy(0, slot_N, x_ND.to(dtype))
    x_ECD = x_PD[:-1].view(num_experts, cap, -1)
    h_ECH = F.silu(torch.bmm(x_ECD, w_gate_EDH.to(dtype))) * torch.bmm(x_ECD, w_up_EDH.to(dtype))
    y_PD = torch.bmm(h_ECH, w_down_EHD.to(dtype)).reshape(num_experts * cap, -1)
    y_ND = torch.cat([y_PD, y_PD.new_zeros(1, y_PD.shape[-1])]).index_select(0, slot_N)
    if max(counts) > cap:
        overflow_N = (pos_N >= cap).nonzero().squeeze(-1)  # expert-sorted, so segments stay contiguous
        y_over = grouped_experts(x_ND.index_select(0, overflow_N), (counts_E - cap).clamp(min=0),
                                 w_gate_EDH, w_up_EDH, w_down_EHD)
        y_ND = y_ND.index_add(0, overflow_N, y_over.to(y_ND.dtype))
    return y_ND


class ExpertBank(nn.Module):
    """E SwiGLU experts stored as three stacked tensors.

    Args:
        num_experts: E.
        d_model: D.
        d_hidden: H, hidden width of one expert.
        impl: a key of EXPERT_IMPLS ("padded" default, "grouped", "loop" the reference).
    Parameters:
        w_gate, w_up: (E, D, H); w_down: (E, H, D). Initialised like nn.Linear per expert.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, impl: str = "padded"):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"impl={impl!r} must be one of {sorted(EXPERT_IMPLS)}")
        self.impl = impl
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so one expert matches SwiGLU's init.
        for w in (self.w_gate, self.w_up, self.w_down):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """(N, D) expert-sorted rows -> (N, D) outputs of their experts."""
        return EXPERT_IMPLS[self.impl](x_ND, counts_E, self.w_gate, self.w_up, self.w_down)

    def extra_repr(self) -> str:
        e, d, h = self.w_gate.shape
        return f"num_experts={e}, d_model={d}, d_hidden={h}, impl={self.impl!r}"
