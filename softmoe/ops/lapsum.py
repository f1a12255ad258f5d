"""LapSum soft top-k: a differentiable relaxation of top-k selection with an exact threshold.

Struski et al., "LapSum - One Method to Differentiate Them All" (ICML 2025). For one row of
scores r (n entries) and a real 0 < k < n, the threshold b solves

    sum_i F((r_i - b) / alpha) = k,        F = Laplace(0, 1) CDF,

and the soft top-k weights are p_i = F((r_i - b) / alpha) in (0, 1), summing to k exactly.
Smaller alpha is harder: alpha -> 0 gives the 0/1 indicator of the k largest scores.

Shape legend (rows are flattened leading dims):
    R   rows (one row = one token's router scores)
    n   entries per row (experts)

How the threshold is made exact for every finite input, in three stages:
    1. Centre: s = (r - max r) / alpha, so a constant added to a row changes nothing (shift
       invariance) and every exponent below is <= 0.
    2. Solve for x = s - t (t: the threshold in units of alpha), by one of two exact methods:
       - `_refine` from `_initial_threshold`: sort-free exact piecewise steps, O(n) each, usually 1-3;
         rows that do not settle within the cap are finished by the closed form (finding them needs a
         host sync, which is free on CPU);
       - `_threshold_closed_form`: the O(n log n) closed form of docs/method.md (sort + prefix sums), a
         fixed amount of work per row and no host sync (used when value checks are off, e.g. on GPUs).
       Partial sums are kept in log space, so nothing underflows into subnormals.
    3. Polish: re-centre every row on its score nearest the threshold, x = (r - r_a) / alpha + x_a
       from the raw scores, and take exact steps again (`_refine`). Near the threshold (where p is
       sensitive) x is then accurate to the dtype's precision however large |r| / alpha or the
       offset, so sum p = k to the dtype's precision.
k and n - k are both carried, each computed in k's own precision, so k close to n stays exact.
The backward is the analytic implicit-function gradient; it saves only x = (r - b) / alpha, O(n)
per row. Half-precision inputs are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from softmoe.ops import lapsum_fast, lapsum_native
from softmoe.ops.checks import all_finite, value_checks_enabled
from softmoe.ops.lapsum_steps import (  # noqa: F401 (the shared steps, imported here by name)
    _check_centred, _exact_where_unsafe, _interval_step, _log_side_sums, _plain_side_sums)
from softmoe.ops.lapsum_triton import lapsum_mode, lapsum_triton, use_triton

__all__ = ["soft_topk", "log_soft_topk"]

_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Pure math on [R, n] rows in the compute dtype
# --------------------------------------------------------------------------------------------


def _exact_side_sums(x_Rn, count, log_below, log_above, unsafe, sync_free: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain side sums of `_plain_side_sums` (count, log L, log U: (R, 1) each) made exact for every row.

    log L or log U is -inf only when its side is empty. The plain sums of e^{-|x|} are exact while each side
    has a score within ~80 (float32) of the threshold; a side whose sum is subnormal or 0 (every score far
    away) would lose its digits, so such rows take log-sum-exp (all rows when `sync_free`, else only those,
    found with a host sync).
    """
    if sync_free:
        exact_below, exact_above = _log_side_sums(x_Rn, x_Rn < 0)
        return count, torch.where(unsafe, exact_below, log_below), torch.where(unsafe, exact_above, log_above)
    return _exact_where_unsafe(x_Rn, count, log_below, log_above, unsafe)


def _start_pass(r_Rn, k_R1, w_R1, alpha, may_sync: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, x0, all_finite): s = (r - max r) / alpha (R, n), x0 = s - t0 at the first threshold t0 (R, n), on the
    root's safe side and exact when every p < 1/2 or every p > 1/2, and whether every s is finite (0-d bool).

    All scores below t: p = e^{s-t}/2, so t = log sum e^s - log 2k (>= the root, since F(x) <= e^x/2;
    s <= 0 with max 0, so the sum is in [1, n]). All above: 1 - p = e^{t-s}/2, so
    t = log 2(n-k) - logsumexp(-s) (<= the root); taken where k > n / 2. `may_sync`: skip that second
    log-sum-exp when no row needs it (a host sync; off when compiled).
    """
    s = torch.sub(r_Rn, r_Rn.amax(dim=-1, keepdim=True)).div_(alpha)
    return s, s - _initial_threshold(s, k_R1, w_R1, may_sync), torch.isfinite(s).all()


def _initial_threshold(s_Rn: torch.Tensor, k_R1: torch.Tensor, w_R1: torch.Tensor, may_sync: bool = True
                       ) -> torch.Tensor:
    """(R, 1) the first threshold t0 of `_start_pass` from s (R, n), k and w = n - k (R, 1)."""
    from_above = s_Rn.exp().sum(-1, keepdim=True).log_() - (k_R1.log() + _LOG2)
    use_below = k_R1 > w_R1
    if may_sync and not bool(use_below.any()):
        return from_above
    from_below = (w_R1.log() + _LOG2) - torch.logsumexp(-s_Rn, -1, keepdim=True)
    return torch.where(use_below, from_below, from_above)


def _recentred(r_Rn: torch.Tensor, x_Rn: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(R, n) the same x = (r - b) / alpha, recomputed around the score a nearest the threshold.

    x = (r - r_a) / alpha + x_a: near the threshold r - r_a is small and exact, so x keeps every digit
    there however large |r| / alpha or an offset common to the row; a frame far from the threshold
    (s - t with |s|, |t| >> 1) would have rounded them away.
    """
    anchor = x_Rn.abs().argmin(dim=-1, keepdim=True)
    return torch.sub(r_Rn, r_Rn.gather(-1, anchor)).div_(alpha).add_(x_Rn.gather(-1, anchor))


def _side_pass(r_Rn: torch.Tensor, x_Rn: torch.Tensor, shift_R1: torch.Tensor | None, alpha: torch.Tensor,
               recentre: bool):
    """One pass over the rows (R, n) (one fused loop under torch.compile): x - shift (the previous step; None:
    no step yet), re-centred, and its plain side sums; returns (x, count, log L, log U, unsafe) as
    `_plain_side_sums`."""
    if shift_R1 is not None:
        x_Rn = x_Rn - shift_R1
    if recentre:
        x_Rn = _recentred(r_Rn, x_Rn, alpha)
    return (x_Rn, *_plain_side_sums(x_Rn))


@functools.cache
def _compiled(name: str):
    """torch.compile of the pure pass `name` of this module (the compiled backend), built on first use."""
    return torch.compile(globals()[name], dynamic=True)


def _passes(compiled: bool) -> tuple[Callable, Callable]:
    """The row passes of the solve (`_start_pass`, `_side_pass`) for a backend: as written, or compiled."""
    if compiled:
        return _compiled("_start_pass"), _compiled("_side_pass")
    return _start_pass, _side_pass


def _refine(
    r_Rn: torch.Tensor, x_Rn: torch.Tensor, w_R1: torch.Tensor, alpha: torch.Tensor, max_steps: int,
    early_exit: bool, recentre_first: bool = True, side_pass: Callable = _side_pass,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact piecewise steps of each row's threshold (x becomes x - u), re-centred before each step.

    A step solves the equation exactly unless it crosses a score, and then stays on the root's safe
    side (see `_interval_step`), so the steps approach the root monotonically: from a safe-side start
    within about 2 min(k, n - k) + 2 steps; router-like rows take 2. The step computed at the root is
    rounding-sized, so a row has converged once its step is below sqrt(eps) (a crossing that small
    leaves an error of order step^2 = eps). With `early_exit` the loop stops once every row has
    converged (a host sync per step: only where syncs are free); without it, it runs `max_steps`.

    The one refine loop of every backend but Triton: each step's O(n) work is one `side_pass` (the previous
    step applied, the re-centring and the plain side sums: `_side_pass`, or its compiled copy from
    `_passes(compiled=True)`); the (R, 1) step and the rare log-sum-exp rows stay eager.

    Returns:
        x_Rn at the refined thresholds, converged_R (R,) bool (all False without early_exit).
    """
    tolerance = math.sqrt(torch.finfo(x_Rn.dtype).eps)
    converged = torch.zeros_like(w_R1, dtype=torch.bool)
    shift = None  # the step not yet applied to x
    for step_index in range(max_steps):
        # The step that converges is taken in a re-centred frame.
        x_Rn, *sums = side_pass(r_Rn, x_Rn, shift, alpha, step_index > 0 or recentre_first)
        step = _interval_step(*_exact_side_sums(x_Rn, *sums, sync_free=not early_exit), w_R1)
        finite = torch.isfinite(step)  # never expected; such a row is left for the closed form
        converged = finite & (step.abs() <= tolerance)
        shift = torch.where(finite, step, 0.0)
        if early_exit and bool(converged.all()):
            break
    if shift is not None:
        x_Rn = x_Rn - shift
    return x_Rn, converged.squeeze(-1) & early_exit


def _threshold_closed_form(s_Rn: torch.Tensor, w_R1: torch.Tensor) -> torch.Tensor:
    """(R, 1) exact threshold t per row in closed form (docs/method.md); fixed work, no host sync.

    Solves sum_j F(t - s_j) = w (= n - k): sort, two log-cum-sum-exps give the soft count at every
    knot, counting finds the bracketing knots, and the quadratic of `_interval_step` solves inside.
    """
    n = s_Rn.shape[-1]
    s_sorted, _ = torch.sort(s_Rn, dim=-1)
    # log B_i = log sum_{j<=i} e^{s_j - s_i},  log A_i = log sum_{j>=i} e^{s_i - s_j}; both in [0, log n].
    log_b = torch.logcumsumexp(s_sorted, dim=-1) - s_sorted
    log_a = s_sorted + torch.logcumsumexp((-s_sorted).flip(-1), dim=-1).flip(-1)
    # Soft count at knot i: sum_j F(s_i - s_j) = ((2i + 1) + A_i - B_i) / 2, increasing in i.
    # m = last knot whose count is <= w (m = -1: the threshold lies below every score). Counting rather
    # than searchsorted stays correct if rounding breaks monotonicity by an ulp.
    idx = torch.arange(n, device=s_Rn.device, dtype=s_Rn.dtype)
    knot_count = 0.5 * ((2.0 * idx + 1.0) + log_a.exp() - log_b.exp())
    m = (knot_count <= w_R1).sum(dim=-1, keepdim=True) - 1  # (R, 1) in [-1, n-1]
    left, right = m.clamp(min=0), (m + 1).clamp(max=n - 1)
    neg_inf = torch.tensor(-math.inf, dtype=s_Rn.dtype, device=s_Rn.device)
    # Solve from the right knot when it exists (t <= s_{m+1}: m + 1 scores below); otherwise from
    # the left one (the threshold is above every score). The side sums there follow from A and B.
    has_right = m + 1 <= n - 1
    s_right = s_sorted.gather(-1, right)
    s_left = s_sorted.gather(-1, left)
    log_b_left = torch.where(m >= 0, log_b.gather(-1, left) + s_left - s_right, neg_inf)
    t_right = s_right + _interval_step((m + 1).to(s_Rn.dtype), log_b_left, log_a.gather(-1, right), w_R1)
    log_b_top = log_b.gather(-1, left)  # m = n - 1: every score is below, sum e^{s_j - s_max} = B_{n-1}
    t_top = s_left + _interval_step(torch.full_like(w_R1, n), log_b_top, torch.full_like(w_R1, -math.inf), w_R1)
    return torch.where(has_right, t_right, t_top)


def _solve_x(r_Rn, k_R1, w_R1, alpha, sync_free: bool, max_steps: int = 8, compiled: bool = False) -> torch.Tensor:
    """(R, n) x = (r - b) / alpha at the exact LapSum threshold b of each row (see module docstring).

    `compiled` (the early-exit solver only): the same solve with its row passes compiled (`_passes`).
    """
    if sync_free:
        s = torch.sub(r_Rn, r_Rn.amax(dim=-1, keepdim=True)).div_(alpha)
        s = s.clamp(min=torch.finfo(s.dtype).min)  # unchecked overflow: finite (ties at the floor), never NaN
        # Fixed work, no host sync: 6 steps (the 10,000-case fuzz needed 5 where ties sit far apart).
        return _refine(r_Rn, s - _threshold_closed_form(s, w_R1), w_R1, alpha, 6, early_exit=False)[0]
    start_pass, side_pass = _passes(compiled)
    s, x0, all_finite = start_pass(r_Rn, k_R1, w_R1, alpha, not compiled)
    _check_centred(bool(all_finite), s, alpha)
    # s itself is a frame centred on the row max: the first step needs no re-centring.
    x, converged = _refine(r_Rn, x0, w_R1, alpha, max_steps, early_exit=True, recentre_first=False,
                           side_pass=side_pass)
    return _finish_unconverged(x, converged, r_Rn, s, w_R1, alpha, max_steps)


def _solve_x_general(r_Rn, k_R1, w_R1, alpha) -> torch.Tensor:
    """`_solve_x` with host syncs allowed (the early-exit solver): what the float32 CPU path (`lapsum_native`,
    `lapsum_fast`) hands its hard rows to."""
    return _solve_x(r_Rn, k_R1, w_R1, alpha, sync_free=False)


def _finish_unconverged(x, converged, r_Rn, s, w_R1, alpha, max_steps: int) -> torch.Tensor:
    """Rows the early-exit steps did not settle (never seen on router-like rows): from the closed form."""
    if not bool(converged.all()):
        rest = (~converged).nonzero().squeeze(-1)
        x_rest = s[rest] - _threshold_closed_form(s[rest], w_R1[rest])
        x_rest, _ = _refine(r_Rn[rest], x_rest, w_R1[rest], alpha, max_steps, early_exit=True)
        x = x.index_put((rest,), x_rest)
    return x


def _cdf(x: torch.Tensor) -> torch.Tensor:
    """F(x): e^x / 2 below 0, 1 - e^{-x} / 2 above (exact either way)."""
    half_e = x.abs().neg().exp().mul_(0.5)
    return torch.where(x < 0, half_e, 1.0 - half_e)


def _laplace_log_cdf(x: torch.Tensor) -> torch.Tensor:
    """log F(x): x - log 2 for x < 0, log(1 - e^{-x} / 2) for x >= 0 (no cancellation)."""
    return torch.where(x < 0, x - _LOG2, torch.log1p(-0.5 * torch.exp(-x.abs())))


def _log_output_slope(x: torch.Tensor) -> torch.Tensor:
    """d log F(x) / dx = f(x) / F(x): 1 for x < 0, 1 / (2 e^x - 1) for x >= 0."""
    return torch.where(x < 0, torch.ones_like(x), 1.0 / torch.expm1(x.clamp(min=0) + _LOG2))


def _lapsum_backward(
    x_Rn: torch.Tensor, grad_out_Rn: torch.Tensor, alpha: torch.Tensor, log: bool, need_k: bool, need_alpha: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Implicit-function gradients of y = F(x) (or log F(x)) through the constraint sum F(x) = k.

    With f = F'(x) = e^{-|x|} / 2, S = sum f, q = f / S = softmax(-|x|), upstream gradient g and
    v = g * dy/dx (g * f for p, g * f / p for log p):
        dL/dr = (v - q * sum v) / alpha,   dL/dalpha = sum v (<q, x> - x) / alpha,
        dL/dk = sum g * dy/dk  with dp/dk = q and dlog p/dk = q / p.
    q is taken from a softmax, so nothing divides by an underflowed S.

    Args:
        x_Rn: (R, n) saved (r - b) / alpha.
        grad_out_Rn: (R, n) upstream gradient g.
        alpha: 0-d temperature.
        log: whether the output was log p.
        need_k, need_alpha: skip the k / alpha reductions when nobody asked for them.
    Returns:
        grad_scores_Rn (R, n), grad_k_R (R,) or None, grad_alpha (0-d) or None.
    """
    neg_abs_x = x_Rn.abs().neg_()
    q = torch.softmax(neg_abs_x, dim=-1)
    if log:
        v = grad_out_Rn * _log_output_slope(x_Rn)
        # log q from log_softmax, not log(q): q underflows to 0 for scores far below the threshold, whose
        # q / p is still finite (both tiny).
        dy_dk = torch.exp(torch.log_softmax(neg_abs_x, dim=-1) - _laplace_log_cdf(x_Rn)) if need_k else None
    else:
        v = grad_out_Rn * neg_abs_x.exp_().mul_(0.5)
        dy_dk = q
    grad_scores = (v - q * v.sum(dim=-1, keepdim=True)).div_(alpha)
    grad_k = (grad_out_Rn * dy_dk).sum(dim=-1) if need_k else None
    grad_alpha = None
    if need_alpha:
        q_dot_x = (q * x_Rn).sum(dim=-1, keepdim=True)
        grad_alpha = (v * (q_dot_x - x_Rn)).sum() / alpha
    return grad_scores, grad_k, grad_alpha


# Rows are processed in blocks of about this many entries: every op of the solve and the backward is
# memory bound, and a block that stays in cache (and in the allocator's reuse range) is 2-3x faster
# than whole-tensor passes at 65536 x 64.
_BLOCK_ENTRIES = 1 << 18


def _row_blocks(num_rows: int, n: int) -> list[slice]:
    rows = max(1, _BLOCK_ENTRIES // n)
    return [slice(start, start + rows) for start in range(0, num_rows, rows)]


class _LapSumTopK(torch.autograd.Function):
    """p = F((r - b) / alpha) (or log p) with b the LapSum threshold; rows are (R, n).

    k_R enters for its gradient; w_R = n - k_R (computed in k's own precision) is a constant.
    """

    @staticmethod
    def forward(ctx, scores_Rn, k_R, w_R, alpha, log: bool, sync_free: bool, compiled: bool = False):
        x = torch.empty_like(scores_Rn)
        for rows in _row_blocks(*scores_Rn.shape):
            x[rows] = _solve_x(scores_Rn[rows], k_R[rows, None], w_R[rows, None], alpha, sync_free,
                               compiled=compiled)
        ctx.save_for_backward(x, alpha)
        ctx.log, ctx.compiled = log, compiled
        output = _compiled("_laplace_log_cdf" if log else "_cdf") if compiled else (_laplace_log_cdf if log else _cdf)
        return output(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, alpha = ctx.saved_tensors
        need_scores, need_k, _, need_alpha = ctx.needs_input_grad[:4]
        grad_scores = torch.empty_like(x) if need_scores else None
        grad_k = x.new_empty(x.shape[0]) if need_k else None
        grad_alpha = x.new_zeros(()) if need_alpha else None
        gradients = _compiled("_lapsum_backward") if ctx.compiled else _lapsum_backward
        for rows in _row_blocks(*x.shape):
            g_scores, g_k, g_alpha = gradients(x[rows], grad_out[rows], alpha, ctx.log, need_k, need_alpha)
            if need_scores:
                grad_scores[rows] = g_scores
            if need_k:
                grad_k[rows] = g_k
            if need_alpha:
                grad_alpha += g_alpha
        return grad_scores, grad_k, None, grad_alpha, None, None, None


def _fast_solve(scores_Rn: torch.Tensor, k_R: torch.Tensor, w_R: torch.Tensor, alpha: torch.Tensor,
                x_rows: str = "all") -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(R, n) x, f = F'(x) and p by the C loop of `lapsum_native` (x where `x_rows` asks, see its `solve`), or where
    it cannot be built by `lapsum_fast`, a block of rows at a time (one block: no row slicing; x always)."""
    native = lapsum_native.library()
    if native is not None:  # the fused C loop: no row blocks needed (it keeps no (R, n) temporaries)
        return lapsum_native.solve(native, scores_Rn, k_R, w_R, alpha, _solve_x_general, x_rows)
    x, f, p = torch.empty_like(scores_Rn), torch.empty_like(scores_Rn), torch.empty_like(scores_Rn)
    blocks = _row_blocks(*scores_Rn.shape)
    if len(blocks) == 1:
        lapsum_fast.solve(scores_Rn, k_R.unsqueeze(-1), w_R.unsqueeze(-1), alpha, x, f, p, _solve_x_general)
        return x, f, p
    for rows in blocks:
        lapsum_fast.solve(scores_Rn[rows], k_R[rows, None], w_R[rows, None], alpha, x[rows], f[rows], p[rows],
                          _solve_x_general)
    return x, f, p


class _LapSumFastTopK(torch.autograd.Function):
    """p = F((r - b) / alpha) for float32 rows (R, n) by the float32 CPU path (`_fast_solve`: the C loop of
    `lapsum_native`, or `lapsum_fast` without a compiler; CPU, value checks on); p only, not log p.

    The same threshold and gradients as `_LapSumTopK`, in fewer and cheaper passes. Saves f = F'(x) and x (x only
    where the backward reads it: every row for a learned alpha, else the rows whose sum f underflows).
    """

    @staticmethod
    def forward(ctx, scores_Rn, k_R, w_R, alpha):
        # The backward reads x only for a learned alpha's gradient and for rows whose sum f is subnormal.
        x, f, p = _fast_solve(scores_Rn, k_R, w_R, alpha, "all" if ctx.needs_input_grad[3] else "backward")
        ctx.save_for_backward(x, f, alpha)
        return p

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, f, alpha = ctx.saved_tensors
        need_k, need_alpha = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        grad_scores = torch.empty_like(x)
        grad_k = x.new_empty(x.shape[0]) if need_k else None
        grad_alpha = x.new_zeros(()) if need_alpha else None
        grad_out = grad_out.contiguous()
        native = lapsum_native.library()
        # The C loop keeps no (R, n) temporaries: one block. The torch path goes a block of rows at a time.
        if native is not None:
            blocks, rows_backward = [slice(None)], functools.partial(lapsum_native.backward, native)
        else:
            blocks, rows_backward = _row_blocks(*x.shape), lapsum_fast.backward
        for rows in blocks:
            g_k, unsafe = rows_backward(f[rows], grad_out[rows], alpha, need_k, grad_scores[rows])
            if bool(unsafe.any()):  # every |x| of a row beyond ~80: q from the softmax form
                redo = unsafe.nonzero().squeeze(-1)
                exact, exact_k, _ = _lapsum_backward(x[rows][redo], grad_out[rows][redo], alpha, False, need_k, False)
                grad_scores[rows] = grad_scores[rows].index_put((redo,), exact)
                g_k = g_k.index_put((redo,), exact_k) if need_k else None
            if need_k:
                grad_k[rows] = g_k
            if need_alpha:
                grad_alpha += _lapsum_backward(x[rows], grad_out[rows], alpha, False, False, True)[2]
        return grad_scores, grad_k, None, grad_alpha


# --------------------------------------------------------------------------------------------
# Argument checking and the public functions
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are solved in float32: the threshold needs more mantissa than bf16 has.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_scores(scores: torch.Tensor, dim, checks: bool) -> int:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype={scores.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension, got a 0-d tensor")
    if not -scores.dim() <= dim < scores.dim():
        raise ValueError(f"dim={dim} is out of range for scores of shape {tuple(scores.shape)}")
    n = scores.shape[dim]
    if n < 2:
        raise ValueError(
            f"scores.shape[dim={dim}]={n}: soft top-k needs at least 2 entries along dim "
            f"(k must satisfy 0 < k < n), scores has shape {tuple(scores.shape)}"
        )
    if checks and not all_finite(scores):
        bad = scores[~torch.isfinite(scores)].flatten()[0].item()
        raise ValueError(f"scores must be finite, found {bad} in scores of shape {tuple(scores.shape)}")
    return n


def _check_alpha(alpha, dtype: torch.dtype, device: torch.device, checks: bool) -> torch.Tensor:
    """alpha as a 0-d tensor in the compute dtype; a normal (not subnormal) positive finite number."""
    tiny = torch.finfo(dtype).tiny
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a float or a 0-d tensor, got shape {tuple(alpha.shape)}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating-point tensor, got dtype={alpha.dtype}")
        alpha_c = alpha.to(device=device, dtype=dtype)
        if checks:
            value = alpha.detach().item()
            if not (math.isfinite(value) and value > 0 and float(alpha_c.detach()) >= tiny):
                raise ValueError(f"alpha={value} must be a finite number > 0 and at least {tiny:.3g} "
                                 f"(the smallest normal {dtype})")
        return alpha_c.clamp(min=tiny) if not checks else alpha_c
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float or a 0-d tensor, got {type(alpha).__name__}")
    value = float(alpha)
    if not (math.isfinite(value) and value >= tiny):
        raise ValueError(f"alpha={value} must be a finite number > 0 and at least {tiny:.3g} "
                         f"(the smallest normal {dtype})")
    return torch.tensor(value, device=device, dtype=dtype)  # not via float32: keep a float64 alpha exact


def smallest_k(n: int, dtype: torch.dtype) -> float:
    """The smallest k the op resolves among n entries in `dtype` (the compute dtype: float32 for half types).

    The threshold is solved for w = n - k, which `dtype` holds to within ulp(n) / 2 <= n eps / 2, so sum p
    differs from k by up to that much; from k = 2^9 n eps on, that is at most 2^-10 of k.
    """
    return 512.0 * n * torch.finfo(_compute_dtype(dtype)).eps


def _check_k(k, batch_shape: torch.Size, n: int, dtype: torch.dtype, device: torch.device, checks: bool):
    """k and w = n - k broadcast to `batch_shape` in `dtype`; both checked in k's own precision.

    w is formed before rounding to `dtype`, so a float64 k = n - 1e-9 keeps its distance to n. k itself must be
    at least `smallest_k(n, dtype)`.
    """
    tiny = torch.finfo(dtype).tiny
    k_min = smallest_k(n, dtype)
    if isinstance(k, torch.Tensor):
        k_own = k.detach() if k.is_floating_point() else k.detach().double()
        wide = torch.promote_types(k_own.dtype, dtype)
        try:
            k_b = k.to(device=device, dtype=dtype).expand(batch_shape)
            w_b = torch.rsub(k_own.to(device=device, dtype=wide), n).to(dtype).expand(batch_shape)  # n - k
        except RuntimeError:
            raise ValueError(
                f"k of shape {tuple(k.shape)} does not broadcast to the scores' shape without dim, "
                f"{tuple(batch_shape)}"
            ) from None
        if checks and k_own.numel() == 1 and k_own.dtype in (torch.float32, torch.float64):
            # One k for every row (a router's k_l): one host read and the checks on the number, instead of
            # ~20 tensor operators over the rows (each an operator call, which is what a decode step pays for).
            # float32 / float64 only: there a Python float compares as k's own dtype does (half types may round
            # n or k_min). Unlike the tensor checks below, this one runs with no rows too, as for a float k.
            _check_k_value(k_own.item(), n, dtype, k_min)
        elif checks:
            bad = ~(torch.isfinite(k_own) & (k_own > 0) & (k_own < n))
            if bool(bad.any()):
                raise ValueError(f"k={k_own[bad].flatten()[0].item()} must satisfy 0 < k < n={n}")
            unresolved = k_own.to(device=device).expand(batch_shape) < k_min
            if bool(unresolved.any()):
                raise ValueError(_below_smallest_k(k_own.expand(batch_shape)[unresolved].flatten()[0].item(), n,
                                                   dtype, k_min))
            small = w_b < tiny
            if bool(small.any()):
                raise ValueError(f"k={k_own.expand(batch_shape)[small].flatten()[0].item()} is within "
                                 f"{tiny:.3g} of 0 or n={n}, beyond {dtype} precision")
        else:  # unchecked: keep the solve finite
            k_b, w_b = k_b.clamp(tiny, n), w_b.clamp(tiny, n)
        return k_b, w_b
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a float or a tensor, got {type(k).__name__}")
    value = float(k)
    _check_k_value(value, n, dtype, k_min)
    return (torch.full(batch_shape, value, device=device, dtype=dtype),
            torch.full(batch_shape, n - value, device=device, dtype=dtype))


def _check_k_value(value: float, n: int, dtype: torch.dtype, k_min: float) -> None:
    """The checks of one k read as a Python number: 0 < k < n, k >= k_min, n - k a normal `dtype` number.

    A float32 or float64 k compares here as it does in its own dtype: k_min = 2^9 n eps is a `dtype` number,
    and n - k is exact near n (Sterbenz), the only place where it can fall below the smallest normal.
    """
    tiny = torch.finfo(dtype).tiny
    if not (math.isfinite(value) and 0 < value < n):
        raise ValueError(f"k={value} must satisfy 0 < k < n={n}")
    if value < k_min:
        raise ValueError(_below_smallest_k(value, n, dtype, k_min))
    if n - value < tiny:
        raise ValueError(f"k={value} is within {tiny:.3g} of 0 or n={n}, beyond {dtype} precision")


def _below_smallest_k(value: float, n: int, dtype: torch.dtype, k_min: float) -> str:
    return (f"k={value:.6g} is below {k_min:.3g}, the smallest k that {dtype} resolves among n={n} entries (the "
            f"threshold is solved for n - k, held to +-{n * torch.finfo(dtype).eps / 2:.2g}); pass float64 scores "
            f"for a smaller k")


def _backend(scores_Rn: torch.Tensor, log: bool, checks: bool) -> str:
    """Which backend solves the rows (R, n): "triton", "fast", "compiled" or "eager".

    SOFTMOE_LAPSUM (softmoe/ops/lapsum_triton.py) picks a backend, never a copy of the algorithm:
        triton    the fused kernels (CUDA float32 rows, n <= 512, by default; `use_triton`);
        compiled  SOFTMOE_LAPSUM=compile with value checks on: the eager solve with its row passes compiled
                  (`_passes`; with checks off the fixed-work solver runs, which torch.compile fuses when the
                  caller compiles the model);
        fast      float32 on CPU, p (not log p), value checks on: the C loop of `lapsum_native`, or where no C
                  compiler works the torch passes of `lapsum_fast` (their rare rows that need the general solver
                  are found with host syncs);
        eager     the general solver, any dtype.
    """
    if use_triton(scores_Rn):
        return "triton"
    if checks and lapsum_mode() == "compile" and not torch.compiler.is_compiling():
        return "compiled"
    if scores_Rn.dtype == torch.float32 and scores_Rn.device.type == "cpu" and not log and checks:
        return "fast"
    return "eager"


def _soft_topk(scores: torch.Tensor, k, alpha, dim: int, log: bool) -> torch.Tensor:
    checks = isinstance(scores, torch.Tensor) and value_checks_enabled(scores)
    n = _check_scores(scores, dim, checks)
    dtype = _compute_dtype(scores.dtype)
    rows_last = scores if dim in (-1, scores.dim() - 1) else scores.movedim(dim, -1)
    batch_shape = rows_last.shape[:-1]
    k_b, w_b = _check_k(k, batch_shape, n, dtype, scores.device, checks)
    alpha_t = _check_alpha(alpha, dtype, scores.device, checks)
    scores_Rn = rows_last.to(dtype).reshape(-1, n)
    k_R, w_R = k_b.reshape(-1), w_b.reshape(-1)
    backend = _backend(scores_Rn, log, checks)
    if backend == "triton":
        out_Rn = lapsum_triton(scores_Rn, k_R, w_R, alpha_t, log, checks)
    elif backend == "fast" and not torch.is_grad_enabled():  # inference: no autograd node, nothing saved
        out_Rn = _fast_solve(scores_Rn, k_R, w_R, alpha_t, "none")[2]
    elif backend == "fast":
        out_Rn = _LapSumFastTopK.apply(scores_Rn, k_R, w_R, alpha_t)
    else:
        out_Rn = _LapSumTopK.apply(scores_Rn, k_R, w_R, alpha_t, log, not checks, backend == "compiled")
    out = out_Rn.reshape(rows_last.shape)
    return (out if rows_last is scores else out.movedim(-1, dim)).to(scores.dtype)


def soft_topk(scores: torch.Tensor, k, alpha=1.0, dim: int = -1) -> torch.Tensor:
    """Soft top-k weights p in (0, 1) summing to k along `dim` (LapSum, exact threshold).

    Args:
        scores: (..., n, ...) floating scores; must be finite, with n >= 2 along `dim`.
        k: float or tensor broadcastable to scores.shape without `dim` (per row, fractional);
            0 < k < n. Differentiable.
        alpha: float or 0-d tensor > 0, the Laplace scale. Smaller is harder. Differentiable.
        dim: the dimension to select along.
    Returns:
        p with the shape and dtype of `scores`; p.sum(dim) == k to the dtype's precision, for any
        finite scores (shift invariant: adding a constant to a row changes nothing). float32/float64
        are computed natively; bf16/fp16 in float32.
    Raises:
        ValueError: k outside (0, n) or of a non-broadcastable shape, k below `smallest_k(n, dtype)`
            (2^9 n eps: 4.9e-4 for 8 float32 entries), alpha <= 0 or subnormal,
            non-finite scores, a row whose (max - min) / alpha overflows, fewer than 2 entries along
            `dim`. Checks that read tensor values follow SOFTMOE_CHECKS (softmoe/ops/checks.py): with
            them off the op makes no host sync and degenerate inputs give finite results.
        TypeError: non-tensor or non-floating scores; k, alpha or dim of the wrong type.
    """
    return _soft_topk(scores, k, alpha, dim, log=False)


def log_soft_topk(scores: torch.Tensor, k, alpha=1.0, dim: int = -1) -> torch.Tensor:
    """log of `soft_topk`, computed stably (no log of an underflowed p). Same arguments.

    log p = x - log 2 for x < 0 and log(1 - e^{-x} / 2) for x >= 0, with x = (r - b) / alpha.
    """
    return _soft_topk(scores, k, alpha, dim, log=True)
