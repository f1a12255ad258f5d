"""The fused Triton LapSum soft top-k: one kernel for the forward, one for the backward.

`soft_topk` / `log_soft_topk` (softmoe/ops/lapsum.py) take this path for float32 compute on CUDA tensors
with n <= 512 entries per row when triton is installed, and the eager path elsewhere. The environment
variable `SOFTMOE_LAPSUM`, read at call time, forces a path:

    auto     (default) Triton on CUDA for n <= MAX_ENTRIES and float32/bf16/fp16 scores, eager otherwise
    triton   always Triton (on CPU tensors only under the interpreter, TRITON_INTERPRET=1: for tests)
    eager    always the eager op
    compile  the eager op with its row passes compiled by torch.compile (softmoe/ops/lapsum.py; opt-in: the
             first call compiles for tens of seconds, then the op is several times faster on CPU)

The kernels (softmoe/ops/_lapsum_kernels.py) do the eager op's math row by row in registers: centre on
the row max, the safe-side start, exact piecewise steps in frames re-centred on the score nearest the
threshold, p = F(x); the backward is the same implicit-function gradient. Triton is imported only
when a kernel runs (no import side effects). Both kernels are sync-free: grad alpha is summed from
per-row parts on the device.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["LAPSUM_MODES", "MAX_ENTRIES", "lapsum_mode", "use_triton", "lapsum_triton", "lapsum_triton_keep",
           "compile_kernels"]

LAPSUM_MODES = ("auto", "triton", "eager", "compile")
MAX_ENTRIES = 512  # a row lives in registers: beyond this the eager op is the better path
# BLOCK_R * BLOCK_E per program (rows per program = this / padded n): at 1024 ptxas reports no register
# spills for sm_90 (2048 spilled at n = 64; benchmarks/triton_registers.py); not yet tuned on a GPU.
_ENTRIES_PER_PROGRAM = 1024


def lapsum_mode() -> str:
    """SOFTMOE_LAPSUM, checked (read at call time)."""
    return _mode()


def _mode() -> str:
    mode = os.environ.get("SOFTMOE_LAPSUM", "auto").strip().lower()
    if mode not in LAPSUM_MODES:
        raise ValueError(f"SOFTMOE_LAPSUM={mode!r} must be one of {LAPSUM_MODES}")
    return mode


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def use_triton(scores_Rn: torch.Tensor) -> bool:
    """Whether the soft top-k of float32 rows `scores_Rn` (R, n) takes the Triton kernels (see module doc)."""
    mode = _mode()
    if mode in ("eager", "compile"):
        return False
    n = scores_Rn.shape[-1]
    if mode == "auto":
        return (scores_Rn.is_cuda and scores_Rn.dtype == torch.float32 and n <= MAX_ENTRIES
                and not torch.compiler.is_compiling() and importlib.util.find_spec("triton") is not None)
    if importlib.util.find_spec("triton") is None:
        raise ValueError("SOFTMOE_LAPSUM=triton but triton is not installed (pip install triton)")
    if n > MAX_ENTRIES:
        raise ValueError(f"SOFTMOE_LAPSUM=triton supports rows of at most {MAX_ENTRIES} entries, got n={n}")
    if scores_Rn.dtype != torch.float32:
        raise ValueError(f"SOFTMOE_LAPSUM=triton computes in float32, got scores of dtype {scores_Rn.dtype}")
    if not scores_Rn.is_cuda and not _interpreting():
        raise ValueError(f"SOFTMOE_LAPSUM=triton needs CUDA tensors (or TRITON_INTERPRET=1), got device "
                         f"{scores_Rn.device}")
    return True


def _blocks(num_rows: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_E, number of programs) for R rows of n entries."""
    block_e = max(16, 1 << (n - 1).bit_length())
    block_r = max(1, min(128, _ENTRIES_PER_PROGRAM // block_e))
    return block_r, block_e, (num_rows + block_r - 1) // block_r


def compile_kernels(arch: int = 90, n: int = 16) -> dict:
    """Compile both kernels, every branch (log p, keep mask, k and alpha grads), to cubins for sm_`arch`.

    Needs no GPU (triton's bundled ptxas), but TRITON_INTERPRET must be unset when the kernels module is
    first imported. The interpreter misses compile-only errors; this finds them. Returns
    {"forward": compiled, "backward": compiled} (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata`).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from softmoe.ops import _lapsum_kernels as kernels

    block_r, block_e, _ = _blocks(1, n)
    rows = {"num_rows": "i32", "n": "i32"}
    forward = {name: "*fp32" for name in ("scores_ptr", "k_ptr", "w_ptr", "alpha_ptr", "x_ptr", "out_ptr")}
    forward.update(keep_ptr="*i1", **rows, max_steps="i32", threshold="fp32", cap_factor="fp32")
    backward = {name: "*fp32" for name in ("x_ptr", "grad_out_ptr", "alpha_ptr", "grad_scores_ptr", "grad_k_ptr",
                                           "grad_alpha_ptr")}
    backward.update(rows)
    blocks = dict(BLOCK_R=block_r, BLOCK_E=block_e)
    compiled = {}
    for name, fn, signature, constexprs in [
        ("forward", kernels.lapsum_forward_kernel, forward, dict(LOG=True, KEEP=True, **blocks)),
        ("backward", kernels.lapsum_backward_kernel, backward, dict(LOG=True, NEED_K=True, NEED_ALPHA=True, **blocks)),
    ]:
        signature.update({key: "constexpr" for key in constexprs})
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled[name] = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    return compiled


class _LapSumTopKTriton(torch.autograd.Function):
    """Triton twin of `lapsum._LapSumTopK`: p = F((r - b) / alpha) (or log p) on float32 (R, n) rows."""

    @staticmethod
    def forward(ctx, scores_Rn, k_R, w_R, alpha, log: bool, keep_rule: tuple[float, float] | None):
        from softmoe.ops import _lapsum_kernels as kernels

        scores_Rn = scores_Rn.contiguous()
        num_rows, n = scores_Rn.shape
        x = torch.empty_like(scores_Rn)
        out = torch.empty_like(scores_Rn)
        keep = torch.empty(scores_Rn.shape if keep_rule else (0, n), dtype=torch.bool, device=scores_Rn.device)
        threshold, cap_factor = keep_rule or (0.0, 1.0)
        if num_rows:
            block_r, block_e, programs = _blocks(num_rows, n)
            kernels.lapsum_forward_kernel[(programs,)](
                scores_Rn, k_R.contiguous(), w_R.contiguous(), alpha, x, out, keep, num_rows, n, 2 * n + 8,
                float(threshold), float(cap_factor),
                LOG=log, KEEP=keep_rule is not None, BLOCK_R=block_r, BLOCK_E=block_e,
            )
        ctx.save_for_backward(x, alpha)
        ctx.log = log
        ctx.mark_non_differentiable(keep)
        return out, keep

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels are not differentiable themselves
    def backward(ctx, grad_out, _grad_keep):
        from softmoe.ops import _lapsum_kernels as kernels

        x, alpha = ctx.saved_tensors
        need_scores, need_k, _, need_alpha = ctx.needs_input_grad[:4]
        num_rows, n = x.shape
        grad_scores = torch.empty_like(x)
        grad_k = x.new_zeros(num_rows)
        grad_alpha_R = x.new_zeros(num_rows)
        if num_rows:
            block_r, block_e, programs = _blocks(num_rows, n)
            kernels.lapsum_backward_kernel[(programs,)](
                x, grad_out.contiguous(), alpha, grad_scores, grad_k, grad_alpha_R, num_rows, n,
                LOG=ctx.log, NEED_K=need_k, NEED_ALPHA=need_alpha, BLOCK_R=block_r, BLOCK_E=block_e,
            )
        return (grad_scores if need_scores else None, grad_k if need_k else None, None,
                grad_alpha_R.sum() if need_alpha else None, None, None)


def lapsum_triton(scores_Rn: torch.Tensor, k_R: torch.Tensor, w_R: torch.Tensor, alpha: torch.Tensor,
                  log: bool, checks: bool) -> torch.Tensor:
    """(R, n) p (or log p) of float32 rows by the Triton kernels; k_R, w_R = n - k_R: (R,); alpha: 0-d.

    With `checks` (a host sync), a row whose (max - min) / alpha overflows float32 is an error as in the
    eager op; without, such a row is floored at the float32 minimum (finite, never NaN).
    """
    return lapsum_triton_keep(scores_Rn, k_R, w_R, alpha, log, checks, None)[0]


def lapsum_triton_keep(scores_Rn: torch.Tensor, k_R: torch.Tensor, w_R: torch.Tensor, alpha: torch.Tensor,
                       log: bool, checks: bool, keep_rule: tuple[float, float] | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`lapsum_triton` and, with keep_rule = (threshold, cap_factor) (p only), the paper's truncation.

    Returns p (R, n) and keep (R, n) bool, equal to `softk.relative_keep(p, k, threshold, cap_factor)`
    computed in the same pass (keep is None without keep_rule).
    """
    if keep_rule is not None and log:
        raise ValueError("lapsum_triton_keep: the truncation keep mask needs p, not log p (log=True)")
    if checks and scores_Rn.numel():
        spread = (scores_Rn.amax(dim=-1) - scores_Rn.amin(dim=-1)) / alpha.detach()
        if not bool(torch.isfinite(spread).all()):
            raise ValueError(
                f"soft_topk: (max - min) / alpha of a row overflows {scores_Rn.dtype} "
                f"(alpha={float(alpha):.6g}); scale the scores down, raise alpha or compute in float64"
            )
    out, keep = _LapSumTopKTriton.apply(scores_Rn, k_R, w_R, alpha, log, keep_rule)
    return out, (keep if keep_rule is not None else None)
