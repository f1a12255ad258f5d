"""The expert bank: E SwiGLU experts as stacked 3-D weights, with interchangeable implementations.

Shape legend:
    N   routed (token, expert) pairs, sorted by expert
    E   experts
    D   d_model
    H   d_hidden (one expert's hidden width)

Rows of x_ND are grouped by expert: expert e owns rows offsets[e]:offsets[e+1] (from counts_E). Rows past
the last offset (the padding of a static-size routing, routing/record.py) get zero outputs in every
implementation.
Implementations (`EXPERT_IMPLS`, chosen by name; `ExpertBank(impl="auto")`, the default, picks per call):
    loop     the spec and test oracle: a Python loop over non-empty experts, plain matmuls.
    grouped  one grouped matmul per projection over the ragged segments
             (`torch.nn.functional.grouped_mm`), no host sync; rows past the last segment are zeroed
             (grouped_mm leaves them unwritten). Falls back to `loop` when the build has no grouped
             matmul for this device and dtype or the row strides are not 16-byte aligned. The default on
             CUDA. On CPU (torch 2.13) grouped_mm runs one matmul per expert internally, so it is only
             as fast as those.
    padded   segments padded to a common capacity and run as batched matmuls (bmm), the few rows of
             overloaded experts past the capacity in a second, smaller padded batch; one host sync (the
             padded shape). The default on CPU: measured faster than `grouped` there at E = 8..64
             (docs/benchmarks.md). With at most 4 rows per expert on average (decoding) it runs the
             non-empty experts one by one instead, so it reads only the active experts' weights.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from softmoe.common.checks import check_choice, check_int

__all__ = [
    "ExpertBank",
    "EXPERT_IMPLS",
    "swiglu",
    "loop_experts",
    "grouped_experts",
    "padded_experts",
    "grouped_mm_supported",
    "compute_dtype",
    "EXPERT_IMPL_CHOICES",
    "auto_impl",
    "pad_rows",
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
        y_ND: (N, D), row i computed by the expert that owns it (zeros past the last offset).
    """
    outputs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):  # one host sync: slice bounds must be Python ints
        if n:
            outputs.append(swiglu(x_ND[start:start + n], w_gate_EDH[e], w_up_EDH[e], w_down_EHD[e]))
        start += n
    if not outputs:  # no rows: an empty product keeps the result attached to the graph
        return pad_rows(swiglu(x_ND[:0], w_gate_EDH[0], w_up_EDH[0], w_down_EHD[0]), x_ND.shape[0])
    return pad_rows(torch.cat(outputs), x_ND.shape[0])


def pad_rows(y_MD: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(M, D) -> (num_rows, D), zero rows appended: the outputs of a static-size routing's padding pairs."""
    if y_MD.shape[0] == num_rows:
        return y_MD
    return F.pad(y_MD, (0, 0, 0, num_rows - y_MD.shape[0]))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype inside autocast, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# (device type, dtype) -> whether grouped_mm ran and matched a loop there; filled by eager probes.
_GROUPED_MM_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype): does grouped_mm run forward and backward and match a loop?

    Under torch.compile tracing the probe (a backward) cannot run: the eager result is used when known,
    else grouped_mm is assumed to work in bf16 on CUDA and CPU (the dtype its shape function accepts in
    torch 2.13, although the eager CPU kernel takes float32 too) and not otherwise.
    """
    key = (device_type, dtype)
    if key in _GROUPED_MM_PROBED:
        return _GROUPED_MM_PROBED[key]
    if torch.compiler.is_compiling():
        return hasattr(F, "grouped_mm") and device_type in ("cuda", "cpu") and dtype == torch.bfloat16
    _GROUPED_MM_PROBED[key] = _probe_grouped_mm(device_type, dtype)
    return _GROUPED_MM_PROBED[key]


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        # Deterministic data: the probe must not consume the global RNG. Outside any autocast region.
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
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
    itemsize = dtype.itemsize
    aligned = (d_model * itemsize) % 16 == 0 and (d_hidden * itemsize) % 16 == 0
    return aligned and _grouped_mm_works(device.type, dtype)


@_register("grouped")
def grouped_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD) -> torch.Tensor:
    """Grouped matmuls over the ragged expert segments; same contract as `loop_experts`."""
    dtype = compute_dtype(x_ND)
    if not grouped_mm_supported(x_ND.device, dtype, x_ND.shape[-1], w_gate_EDH.shape[-1]):
        return loop_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD)
    # grouped_mm is not on autocast's cast list, so cast explicitly to what autocast would use.
    offs_E = counts_E.cumsum(0).to(torch.int32)
    # grouped_mm leaves rows past the last offset (a static-size routing's padding) unwritten, in its outputs
    # and in the input gradients of its backward. Masking the input and the output rows there, on the device
    # (no sync), keeps that uninitialised memory out of the combine (forward) and of x's gradient (backward).
    in_segment_N1 = (torch.arange(x_ND.shape[0], device=x_ND.device) < offs_E[-1:]).unsqueeze(-1)
    x = torch.where(in_segment_N1, x_ND.to(dtype), 0.0)
    gate_NH = F.grouped_mm(x, w_gate_EDH.to(dtype), offs=offs_E)
    up_NH = F.grouped_mm(x, w_up_EDH.to(dtype), offs=offs_E)
    y_ND = F.grouped_mm(F.silu(gate_NH) * up_NH, w_down_EHD.to(dtype), offs=offs_E)
    return torch.where(in_segment_N1, y_ND, 0.0)


def _bucket(rows: int) -> int:
    """`rows` rounded up to a multiple of 2^(bits - 4): at most 1/8 more, and only ~8 sizes per octave.

    Padded shapes recur from step to step instead of following every count: each new matmul shape
    costs oneDNN a new primitive (kept in its cache) and the allocator new block sizes, which grew a
    training process's memory step after step (docs/benchmarks.md).
    """
    granule = 1 << max(0, rows.bit_length() - 4)
    return -(-rows // granule) * granule


# At most this many rows per expert on average, `padded` runs the non-empty experts one by one (`loop`).
_FEW_ROWS_PER_EXPERT = 4


def _padded_capacity(counts: list[int], call_cost: float = 64.0) -> tuple[int, int]:
    """(C, C2): rows per expert in the main padded batch and in the overflow batch (0: none).

    The main batch is E x C rows. The experts with more than C rows run their extra rows in a second
    padded batch of (overflowing experts) x C2 rows, C2 >= max count - C, which costs a fixed
    `call_cost` (three more bmm calls, a weight gather). C is the bucketed (`_bucket`) count that
    minimises the padded rows of both batches plus that fixed cost.
    """
    num_experts, largest = len(counts), max(counts)

    def plan(cap: int) -> tuple[float, int, int]:
        over = sum(1 for n in counts if n > cap)
        cap2 = _bucket(largest - cap) if over else 0
        return num_experts * cap + over * cap2 + (call_cost if over else 0.0), cap, cap2

    _, cap, cap2 = min(plan(_bucket(n)) for n in set(counts) if n > 0) if largest > 0 else (0, 1, 0)
    return cap, cap2


def _batched_swiglu(x_ECD: torch.Tensor, w_gate_EDH, w_up_EDH, w_down_EHD) -> torch.Tensor:
    """SwiGLU of each expert on its padded rows, three bmms: (E, C, D) -> (E * C, D)."""
    dtype = x_ECD.dtype
    h_ECH = F.silu(torch.bmm(x_ECD, w_gate_EDH.to(dtype))) * torch.bmm(x_ECD, w_up_EDH.to(dtype))
    return torch.bmm(h_ECH, w_down_EHD.to(dtype)).flatten(0, 1)


@_register("padded")
def padded_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD) -> torch.Tensor:
    """Batched matmuls over expert segments padded to a common capacity, overflow in a second batch.

    Expert e's first min(count_e, C) rows go to slot e of an (E, C, D) batch (zeros elsewhere) and
    run as three `bmm`s; the rows beyond C of the E_o overloaded experts go to a second, smaller
    (E_o, C2, D) batch over those experts only. Both batches live in one zero-padded buffer that one
    `index_copy` fills, and the outputs are gathered back with distinct indices, so neither direction
    needs a scatter-add and every buffer has a bucketed size. Nothing is dropped. On CPU a bmm
    parallelises over experts and keeps every core on a large matmul, where per-expert matmuls of a
    few hundred rows (what `grouped_mm` runs internally) are much slower. C trades padding against
    the second batch (`_padded_capacity`). Same contract as `loop_experts`.
    """
    counts = counts_E.tolist()  # one host sync: the padded shape must be known
    num_rows, num_experts = sum(counts), len(counts)
    if num_rows < x_ND.shape[0]:  # a static-size routing: the real rows, then zeros for its padding
        return pad_rows(padded_experts(x_ND[:num_rows], counts_E, w_gate_EDH, w_up_EDH, w_down_EHD), x_ND.shape[0])
    if num_rows <= _FEW_ROWS_PER_EXPERT * num_experts:
        # Few rows (decoding: a token or a small batch per step): the matmuls are bound by reading the weights,
        # and a padded batch would read every expert's, the empty ones included. The non-empty experts one by
        # one read only theirs, so the time follows the active experts.
        return loop_experts(x_ND, counts_E, w_gate_EDH, w_up_EDH, w_down_EHD)
    cap, cap2 = _padded_capacity(counts)
    over = [e for e, n in enumerate(counts) if n > cap]
    device, main_rows = x_ND.device, num_experts * cap
    offsets_E = counts_E.cumsum(0) - counts_E
    expert_N = torch.repeat_interleave(torch.arange(num_experts, device=device), counts_E, output_size=num_rows)
    pos_N = torch.arange(num_rows, device=device) - offsets_E.index_select(0, expert_N)
    slot_N = expert_N * cap + pos_N  # main batch: row pos of expert e's block
    if over:
        # Overflow rows: row (pos - C) of the overloaded expert's block in the second batch.
        local_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
        local_E[over] = torch.arange(len(over), device=device)
        over_slot_N = main_rows + local_E.index_select(0, expert_N) * cap2 + (pos_N - cap)
        slot_N = torch.where(pos_N < cap, slot_N, over_slot_N)
    x_PD = x_ND.new_zeros(main_rows + len(over) * cap2, x_ND.shape[-1], dtype=compute_dtype(x_ND))
    x_PD = x_PD.index_copy(0, slot_N, x_ND.to(x_PD.dtype))
    weights = (w_gate_EDH, w_up_EDH, w_down_EHD)
    y_PD = _batched_swiglu(x_PD[:main_rows].view(num_experts, cap, -1), *weights)
    if over:
        over_E = torch.tensor(over, device=device)
        y_over = _batched_swiglu(x_PD[main_rows:].view(len(over), cap2, -1),
                                 *(_GatherRows.apply(w, over_E) for w in weights))
        y_PD = torch.cat([y_PD, y_over])
    return _GatherRows.apply(y_PD, slot_N)


class _GatherRows(torch.autograd.Function):
    """out = src.index_select(0, index) for DISTINCT indices; backward copies the gradient rows back
    (index_copy into zeros) instead of autograd's scatter-add, which is slow on CPU."""

    @staticmethod
    def forward(ctx, src_PD, index_N):
        ctx.save_for_backward(index_N)
        ctx.num_rows = src_PD.shape[0]
        return src_PD.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (index_N,) = ctx.saved_tensors
        return grad_ND.new_zeros((ctx.num_rows, *grad_ND.shape[1:])).index_copy_(0, index_N, grad_ND), None


EXPERT_IMPL_CHOICES = ("auto", *EXPERT_IMPLS)  # "auto": `auto_impl` of the rows' device, per call


def auto_impl(device: torch.device) -> str:
    """The default implementation on `device`: `grouped` on CUDA and under torch.compile tracing (no host
    sync), `padded` elsewhere (its padded shape needs one)."""
    return "grouped" if device.type == "cuda" or torch.compiler.is_compiling() else "padded"


class ExpertBank(nn.Module):
    """E SwiGLU experts stored as three stacked tensors.

    Args:
        num_experts: E.
        d_model: D.
        d_hidden: H, hidden width of one expert.
        impl: "auto" (default: `grouped` on CUDA, `padded` elsewhere) or a key of EXPERT_IMPLS to force one
            ("padded", "grouped", "loop" the reference).
    Parameters:
        w_gate, w_up: (E, D, H); w_down: (E, H, D). Initialised like nn.Linear per expert.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, impl: str = "auto"):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            check_int(name, value, 1)
        check_choice("impl", impl, EXPERT_IMPL_CHOICES)
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
        return self.impl_fn(x_ND.device)(x_ND, counts_E, self.w_gate, self.w_up, self.w_down)

    def impl_fn(self, device: torch.device) -> ExpertsFn:
        """The implementation this bank runs for rows on `device` ("auto" resolved by `auto_impl`)."""
        return EXPERT_IMPLS[auto_impl(device) if self.impl == "auto" else self.impl]

    def extra_repr(self) -> str:
        e, d, h = self.w_gate.shape
        return f"num_experts={e}, d_model={d}, d_hidden={h}, impl={self.impl!r}"
