"""LapSum soft top-k: a differentiable relaxation of top-k selection with an exact threshold.

Struski et al., "LapSum - One Method to Differentiate Them All" (ICML 2025). For one row of
scores r (n entries) and a real 0 < k < n, the threshold b solves

    sum_i F((r_i - b) / alpha) = k,        F = Laplace(0, 1) CDF,

and the soft top-k weights are p_i = F((r_i - b) / alpha) in (0, 1), summing to k exactly.
Smaller alpha is harder: alpha -> 0 gives the 0/1 indicator of the k largest scores.

Shape legend (rows are flattened leading dims):
    R   rows (one row = one token's router scores)
    n   entries per row (experts)

The threshold is exact: a sort-free piecewise iteration that lands on the root in a few O(n) steps
(`_threshold_newton`), with the O(n log n) closed form of METHOD.md as its reference twin and its
fallback for rows that do not settle (`_threshold_closed_form`).
The backward is the analytic implicit-function gradient; it saves only x = (r - b) / alpha, O(n)
per row. Half-precision inputs are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["soft_topk", "log_soft_topk"]

_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Pure math on [R, n] rows in the compute dtype
# --------------------------------------------------------------------------------------------


def _threshold_closed_form(s_Rn: torch.Tensor, k_R: torch.Tensor) -> torch.Tensor:
    """Exact LapSum threshold t (in units of alpha) for each row, in closed form (METHOD.md).

    O(n log n) per row: sort, two log-cumsum-exps, a count and a quadratic. The reference twin of
    `_threshold_newton` and its fallback for rows the iteration does not settle.

    Solves sum_j F(s_j - t) = k, equivalently sum_j F(t - s_j) = w with w = n - k.

    Args:
        s_Rn: (R, n) scores divided by alpha, any order.
        k_R: (R,) target sums, 0 < k < n.
    Returns:
        t_R: (R,) thresholds such that p = F(s - t) sums to k.
    """
    n = s_Rn.shape[-1]
    s_sorted, _ = torch.sort(s_Rn, dim=-1)
    # log B_i = log sum_{j<=i} exp(s_j - s_i),  log A_i = log sum_{j>=i} exp(s_i - s_j).
    # Both are >= 0 and <= log n, so exponentiating them cannot overflow.
    log_b = torch.logcumsumexp(s_sorted, dim=-1) - s_sorted
    log_a = s_sorted + torch.logcumsumexp((-s_sorted).flip(-1), dim=-1).flip(-1)

    # Soft count at knot i: sum_j F(s_i - s_j) = ((2i + 1) + A_i - B_i) / 2, increasing in i.
    # m = last knot whose count is <= w (m = -1: the threshold lies below every score).
    # Counting instead of searchsorted stays correct if rounding breaks monotonicity by an ulp.
    idx = torch.arange(n, device=s_Rn.device, dtype=s_Rn.dtype)
    knot_count = 0.5 * ((2.0 * idx + 1.0) + log_a.exp() - log_b.exp())
    w = (n - k_R).unsqueeze(-1)
    m = (knot_count <= w).sum(dim=-1, keepdim=True) - 1  # (R, 1) in [-1, n-1]

    # Knots bracketing the threshold; missing sides (m = -1 or m + 1 = n) are masked below.
    left = m.clamp(min=0)
    right = (m + 1).clamp(max=n - 1)
    s_left = s_sorted.gather(-1, left)
    s_right = s_sorted.gather(-1, right)
    log_b_left = log_b.gather(-1, left)
    log_a_right = log_a.gather(-1, right)
    has_left = m >= 0
    has_right = m + 1 <= n - 1

    # Inside [s_m, s_{m+1}]: i* - B_m e^{s_m - t} / 2 + A_{m+1} e^{t - s_{m+1}} / 2 = w, a quadratic
    # in e^t. With e = w - i* and D = e^2 + A B e^{s_m - s_{m+1}}, take the cancellation-free root,
    # all in log space so a huge gap (e^{s_m - s_{m+1}} -> 0) or e = 0 stays finite.
    e = w - (m + 1).to(s_Rn.dtype)
    log_abs_e = e.abs().log()
    neg_inf = torch.full_like(log_abs_e, -math.inf)
    log_product = torch.where(has_left & has_right, log_a_right + log_b_left + (s_left - s_right), neg_inf)
    log_d = torch.logaddexp(2.0 * log_abs_e, log_product)
    log_root = torch.logaddexp(log_abs_e, 0.5 * log_d)  # log(|e| + sqrt(D))
    t_from_right = s_right + log_root - log_a_right  # used when e > 0 (then m + 1 <= n - 1)
    t_from_left = s_left - log_root + log_b_left  # used when e <= 0 (then m >= 0)
    return torch.where(e > 0, t_from_right, t_from_left).squeeze(-1)


def _interval_step(
    count_R1: torch.Tensor, below_sum_R1: torch.Tensor, above_sum_R1: torch.Tensor, w_R1: torch.Tensor
) -> torch.Tensor:
    """Exact step u solving the threshold equation, assuming no score lies between t and t + u.

    With c scores below t, L = sum_{s_j < t} e^{s_j - t} and U = sum_{s_j >= t} e^{t - s_j}, the
    left-hand side at t + u is c - L e^{-u} / 2 + U e^{u} / 2 = w: a quadratic in e^u. The root is
    taken in the cancellation-free form, in log space (d = w - c, D = d^2 + L U).
    """
    d = w_R1 - count_R1
    log_abs_d = d.abs().log()
    log_u, log_l = above_sum_R1.log(), below_sum_R1.log()
    log_root = torch.logaddexp(log_abs_d, 0.5 * torch.logaddexp(2.0 * log_abs_d, log_l + log_u))
    return torch.where(d > 0, log_root - log_u, log_l - log_root)


@dataclass(frozen=True)
class _Pass:
    """One O(n) pass over the rows at thresholds t: everything a step and the output need.

    x: (R, n) s - t;  below: (R, n) 1.0 where x < 0 else 0.0;  e: (R, n) exp(-|x|);
    count: (R, 1) number below;  sum_below: (R, 1) sum of e below;  sum_above: (R, 1) sum of e at/above.
    """

    x: torch.Tensor
    below: torch.Tensor
    e: torch.Tensor
    count: torch.Tensor
    sum_below: torch.Tensor
    sum_above: torch.Tensor


def _pass_at(s_Rn: torch.Tensor, t_R1: torch.Tensor) -> _Pass:
    x = s_Rn - t_R1
    # Float masks, not bool: this pass is memory bound and bool kernels (where, masked sums) are slow on CPU.
    below = torch.heaviside(x.neg(), x.new_zeros(()))  # 1.0 where x < 0, else 0.0
    e = x.abs().neg_().exp_()
    e_below = e * below
    e_above = e - e_below  # exact: each entry is e or 0, so no cancellation
    return _Pass(x, below, e, below.sum(-1, keepdim=True), e_below.sum(-1, keepdim=True), e_above.sum(-1, keepdim=True))


def _initial_threshold(s_Rn: torch.Tensor, k_R: torch.Tensor) -> torch.Tensor:
    """(R, 1) a first threshold: exact when every p < 1/2 (k <= n/2) or every p > 1/2 (k > n/2).

    All scores below t: p = e^{s - t} / 2, so t = logsumexp(s) - log 2k. All above: 1 - p = e^{t - s} / 2,
    so t = log 2(n - k) - logsumexp(-s). This is where one step from max(s) (or min(s)) would land.
    """
    n = s_Rn.shape[-1]
    k = k_R.unsqueeze(-1)
    small = k <= n / 2
    if bool(small.all()):
        return torch.logsumexp(s_Rn, -1, keepdim=True) - torch.log(2.0 * k)
    from_above = torch.log(2.0 * (n - k)) - torch.logsumexp(-s_Rn, -1, keepdim=True)
    if not bool(small.any()):
        return from_above
    return torch.where(small, torch.logsumexp(s_Rn, -1, keepdim=True) - torch.log(2.0 * k), from_above)


def _threshold_newton(s_Rn: torch.Tensor, k_R: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, _Pass]:
    """LapSum threshold by exact piecewise steps; O(n) per iteration, no sort.

    Each step solves the equation exactly on the current interval between scores (`_interval_step`).
    When the step crosses scores, the local model errs on the safe side (cosh >= 1), so the iterates
    approach the root monotonically from any start and land on it once no score is crossed. A row has
    converged when a step leaves its count of scores below t unchanged: that step was exact.
    Router-like scores settle after 1-2 steps from `_initial_threshold`; the caller solves the rest in
    closed form.

    Args:
        s_Rn: (R, n) scores divided by alpha.
        k_R: (R,) target sums, 0 < k < n.
        max_iter: iteration cap.
    Returns:
        t_R1: (R, 1) thresholds (exact where converged), converged_R: (R,) bool, and the pass at t_R1.
    """
    w = (s_Rn.shape[-1] - k_R).unsqueeze(-1)
    t = _initial_threshold(s_Rn, k_R)
    prev_count = torch.full_like(w, -1.0)
    steps_finite = torch.ones_like(w, dtype=torch.bool)
    for _ in range(max_iter):
        at_t = _pass_at(s_Rn, t)
        converged = (at_t.count == prev_count) & steps_finite
        if bool((converged | ~steps_finite).all()):
            break
        step = _interval_step(at_t.count, at_t.sum_below, at_t.sum_above, w)
        # An underflowed partial sum gives an infinite step: freeze that row for the fallback.
        steps_finite &= torch.isfinite(step)
        t = torch.where(steps_finite & ~converged, t + step, t)
        prev_count = at_t.count
    else:
        at_t = _pass_at(s_Rn, t)
        converged = (at_t.count == prev_count) & steps_finite
    return t, converged.squeeze(-1), at_t


def _solve_threshold(s_Rn: torch.Tensor, k_R: torch.Tensor, max_iter: int = 16) -> _Pass:
    """Exact LapSum threshold per row: fast piecewise iteration, closed form where it does not settle.

    Args:
        s_Rn: (R, n) scores divided by alpha.
        k_R: (R,) target sums, 0 < k < n.
    Returns:
        the pass at the thresholds t with sum_j F(s_j - t) = k (its x = s - t gives the output).
    """
    t, converged, at_t = _threshold_newton(s_Rn, k_R, max_iter)
    if bool(converged.all()):
        return at_t
    rest = (~converged).nonzero().squeeze(-1)
    t = t.index_put((rest,), _threshold_closed_form(s_Rn[rest], k_R[rest]).unsqueeze(-1))
    return _pass_at(s_Rn, t)


def _cdf_from_pass(at_t: _Pass) -> torch.Tensor:
    """F(x) from a pass without another exp: e/2 below the threshold, 1 - e/2 above (exact either way)."""
    half_e = at_t.e * 0.5
    return torch.addcmul(half_e, 1.0 - at_t.below, torch.rsub(half_e, 1.0, alpha=2.0))


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
        dy_dk = torch.exp(torch.log(q) - _laplace_log_cdf(x_Rn)) if need_k else None
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
    """p = F((r - b) / alpha) (or log p) with b the LapSum threshold; rows are (R, n)."""

    @staticmethod
    def forward(ctx, scores_Rn: torch.Tensor, k_R: torch.Tensor, alpha: torch.Tensor, log: bool):
        x = torch.empty_like(scores_Rn)
        out = torch.empty_like(scores_Rn)
        for rows in _row_blocks(*scores_Rn.shape):
            at_t = _solve_threshold(scores_Rn[rows] / alpha, k_R[rows])
            x[rows] = at_t.x
            out[rows] = _laplace_log_cdf(at_t.x) if log else _cdf_from_pass(at_t)
        ctx.save_for_backward(x, alpha)
        ctx.log = log
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, alpha = ctx.saved_tensors
        need_scores, need_k, need_alpha = ctx.needs_input_grad[:3]
        grad_scores = torch.empty_like(x) if need_scores else None
        grad_k = x.new_empty(x.shape[0]) if need_k else None
        grad_alpha = x.new_zeros(()) if need_alpha else None
        for rows in _row_blocks(*x.shape):
            g_scores, g_k, g_alpha = _lapsum_backward(x[rows], grad_out[rows], alpha, ctx.log, need_k, need_alpha)
            if need_scores:
                grad_scores[rows] = g_scores
            if need_k:
                grad_k[rows] = g_k
            if need_alpha:
                grad_alpha += g_alpha
        return grad_scores, grad_k, grad_alpha, None


# --------------------------------------------------------------------------------------------
# Argument checking and the public functions
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are solved in float32: the threshold needs more mantissa than bf16 has.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_scores(scores: torch.Tensor, dim: int) -> int:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype={scores.dtype}")
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
    # A finite sum proves every entry finite in one cheap reduction; only then is the exact check needed
    # (the sum can also overflow on finite inputs).
    if scores.numel() and not bool(torch.isfinite(scores.sum())) and not bool(
        torch.isfinite(scores).all()
    ):
        bad = scores[~torch.isfinite(scores)].flatten()[0].item()
        raise ValueError(f"scores must be finite, found {bad} in scores of shape {tuple(scores.shape)}")
    return n


def _check_alpha(alpha, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a float or a 0-d tensor, got shape {tuple(alpha.shape)}")
        value = alpha.detach().item()
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        value = float(alpha)
    else:
        raise TypeError(f"alpha must be a float or a 0-d tensor, got {type(alpha).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"alpha={value} must be a finite number > 0")
    if isinstance(alpha, torch.Tensor):
        return alpha.to(device=device, dtype=dtype)
    return torch.tensor(value, device=device, dtype=dtype)  # not via float32: keep a float64 alpha exact


def _check_k(k, batch_shape: torch.Size, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Return k broadcast to `batch_shape`, in `dtype`, after checking 0 < k < n everywhere."""
    if isinstance(k, torch.Tensor):
        try:
            k_b = k.to(device=device, dtype=dtype).expand(batch_shape)
        except RuntimeError:
            raise ValueError(
                f"k of shape {tuple(k.shape)} does not broadcast to the scores' shape without dim, "
                f"{tuple(batch_shape)}"
            ) from None
        k_values = k.detach()
    elif isinstance(k, (int, float)) and not isinstance(k, bool):
        k_b = torch.full(batch_shape, float(k), device=device, dtype=dtype)
        k_values = torch.tensor(float(k))
    else:
        raise TypeError(f"k must be a float or a tensor, got {type(k).__name__}")
    bad = ~(torch.isfinite(k_values) & (k_values > 0) & (k_values < n))
    if bool(bad.any()):
        raise ValueError(f"k={k_values[bad].flatten()[0].item()} must satisfy 0 < k < n={n}")
    return k_b


def _soft_topk(scores: torch.Tensor, k, alpha, dim: int, log: bool) -> torch.Tensor:
    n = _check_scores(scores, dim)
    dtype = _compute_dtype(scores.dtype)
    rows_last = scores.movedim(dim, -1)
    batch_shape = rows_last.shape[:-1]
    k_b = _check_k(k, batch_shape, n, dtype, scores.device)
    alpha_t = _check_alpha(alpha, dtype, scores.device)
    scores_Rn = rows_last.to(dtype).reshape(-1, n)
    out_Rn = _LapSumTopK.apply(scores_Rn, k_b.reshape(-1), alpha_t, log)
    return out_Rn.reshape(rows_last.shape).movedim(-1, dim).to(scores.dtype)


def soft_topk(scores: torch.Tensor, k, alpha=1.0, dim: int = -1) -> torch.Tensor:
    """Soft top-k weights p in (0, 1) summing to k along `dim` (LapSum, exact threshold).

    Args:
        scores: (..., n, ...) floating scores; must be finite, with n >= 2 along `dim`.
        k: float or tensor broadcastable to scores.shape without `dim` (per row, fractional);
            0 < k < n. Differentiable.
        alpha: float or 0-d tensor > 0, the Laplace scale. Smaller is harder. Differentiable.
        dim: the dimension to select along.
    Returns:
        p with the shape and dtype of `scores`; p.sum(dim) == k. float32/float64 are computed
        natively; bf16/fp16 in float32.
    Raises:
        ValueError: k outside (0, n) or of a non-broadcastable shape, alpha <= 0, non-finite
            scores, fewer than 2 entries along `dim`.
        TypeError: non-tensor or non-floating scores; k or alpha of the wrong type.
    """
    return _soft_topk(scores, k, alpha, dim, log=False)


def log_soft_topk(scores: torch.Tensor, k, alpha=1.0, dim: int = -1) -> torch.Tensor:
    """log of `soft_topk`, computed stably (no log of an underflowed p). Same arguments.

    log p = x - log 2 for x < 0 and log(1 - e^{-x} / 2) for x >= 0, with x = (r - b) / alpha.
    """
    return _soft_topk(scores, k, alpha, dim, log=True)
