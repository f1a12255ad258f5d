"""The exact piecewise threshold step of LapSum soft top-k and its side sums, shared by both CPU solvers.

softmoe/ops/lapsum.py (the general solver, any dtype) and softmoe/ops/lapsum_fast.py (float32 on CPU) both
import these; the math is explained in lapsum.py's module docstring.

Shape legend: R rows, n entries per row.
"""

from __future__ import annotations

import math

import torch

def _log_side_sums(x_Rn: torch.Tensor, below_Rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, 1) log L = log sum_{x<0} e^x and log U = log sum_{x>=0} e^-x by log-sum-exp (-inf: empty side)."""
    neg_abs = x_Rn.abs().neg_()
    neg_inf = torch.tensor(-math.inf, dtype=x_Rn.dtype, device=x_Rn.device)
    log_below = torch.logsumexp(torch.where(below_Rn, neg_abs, neg_inf), dim=-1, keepdim=True)
    log_above = torch.logsumexp(torch.where(below_Rn, neg_inf, neg_abs), dim=-1, keepdim=True)
    return log_below, log_above


def _plain_side_sums(x_Rn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """At threshold x = 0, from plain sums of e^{-|x|}: (R, 1) count below, log L, log U, and `unsafe`.

    `unsafe` marks rows where a side's plain sum lost digits (see `_side_sums`). Pure: one fused loop
    under torch.compile.
    """
    # Float masks, not bool: these passes are memory bound and bool kernels are slow on CPU.
    below = torch.heaviside(x_Rn.neg(), x_Rn.new_zeros(()))  # 1.0 where x < 0, else 0.0
    e = x_Rn.abs().neg_().exp_()
    e_below = e * below
    sum_below = e_below.sum(dim=-1, keepdim=True)
    sum_above = e.sub_(e_below).sum(dim=-1, keepdim=True)  # per entry e or 0: no cancellation
    count = below.sum(dim=-1, keepdim=True)
    # A side's sum keeps full precision while it is a normal number at least 2^mantissa above the
    # smallest one; an empty side is exact at 0.
    finfo = torch.finfo(x_Rn.dtype)
    safe = finfo.tiny / finfo.eps
    n = x_Rn.shape[-1]
    unsafe = ((sum_below < safe) & (count > 0)) | ((sum_above < safe) & (count < n))
    return count, sum_below.log(), sum_above.log(), unsafe


def _exact_where_unsafe(x_Rn, count, log_below, log_above, unsafe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The side sums of `_plain_side_sums` with its unsafe rows redone by log-sum-exp (a host sync to find them)."""
    if bool(unsafe.any()):
        rows = unsafe.squeeze(-1).nonzero().squeeze(-1)
        exact_below, exact_above = _log_side_sums(x_Rn[rows], x_Rn[rows] < 0)
        log_below, log_above = log_below.index_put((rows,), exact_below), log_above.index_put((rows,), exact_above)
    return count, log_below, log_above


def _interval_step(count_R1, log_below_R1, log_above_R1, w_R1) -> torch.Tensor:
    """(R, 1) step u of the threshold that solves the equation if no score lies between t and t + u.

    With c scores below t, L = sum_{s<t} e^{s-t} and U = sum_{s>=t} e^{t-s}, sum_j F(t + u - s_j) is
    c - L e^{-u} / 2 + U e^{u} / 2 = w: a quadratic in e^u. Its root, in the cancellation-free form
    with d = w - c and D = d^2 + L U: u = log(|d| + sqrt D) - log U for d > 0, else
    u = log L - log(|d| + sqrt D). Crossing a score, the model errs on the safe side (cosh >= 1),
    so steps approach the root monotonically and land on it once they cross no score.
    """
    d = w_R1 - count_R1
    log_abs_d = d.abs().log()
    log_sqrt_disc = 0.5 * torch.logaddexp(2.0 * log_abs_d, log_below_R1 + log_above_R1)
    log_root = torch.logaddexp(log_abs_d, log_sqrt_disc)
    return torch.where(d > 0, log_root - log_above_R1, log_below_R1 - log_root)


def _check_centred(all_finite: bool, s: torch.Tensor, alpha: torch.Tensor) -> None:
    if not all_finite:
        raise ValueError(
            f"soft_topk: (max - min) / alpha of a row overflows {s.dtype} (alpha={float(alpha):.6g}); "
            "scale the scores down, raise alpha or compute in float64"
        )
