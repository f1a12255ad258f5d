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


def _threshold_newton(s_Rn: torch.Tensor, k_R: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LapSum threshold by exact piecewise steps; O(n) per iteration, no sort.

    Each step solves the equation exactly on the current interval between scores (`_interval_step`).
    When the step crosses scores, the local model errs on the safe side (cosh >= 1), so the iterates
    approach the root monotonically and land on it once no score is crossed. A row has converged
    when a step leaves its count of scores below t unchanged: that step was exact.
    Typical router scores settle in 2-4 steps; the caller solves the rest in closed form.

    Args:
        s_Rn: (R, n) scores divided by alpha.
        k_R: (R,) target sums, 0 < k < n.
        max_iter: iteration cap.
    Returns:
        t_R1: (R, 1) thresholds (exact where converged), converged_R: (R,) bool.
    """
    n = s_Rn.shape[-1]
    w = (n - k_R).unsqueeze(-1)
    # Start from the side the root is nearer: above every score for small k, below for large k.
    t = torch.where(k_R.unsqueeze(-1) <= n / 2, s_Rn.amax(-1, keepdim=True), s_Rn.amin(-1, keepdim=True))
    prev_count = torch.full_like(w, -1.0)
    steps_finite = torch.ones_like(w, dtype=torch.bool)
    converged = torch.zeros_like(steps_finite)
    for _ in range(max_iter):
        x = s_Rn - t
        # Float masks and in-place exp: this loop is memory bound, and bool kernels are slow on CPU.
        below = (x < 0).to(s_Rn.dtype)
        e = x.abs_().neg_().exp_()
        e_below = e * below
        count = below.sum(-1, keepdim=True)
        converged = (count == prev_count) & steps_finite
        if bool((converged | ~steps_finite).all()):
            break
        step = _interval_step(count, e_below.sum(-1, keepdim=True), e.sub_(e_below).sum(-1, keepdim=True), w)
        # An underflowed partial sum gives an infinite step: freeze that row for the fallback.
        steps_finite &= torch.isfinite(step)
        t = torch.where(steps_finite & ~converged, t + step, t)
        prev_count = count
    return t, converged.squeeze(-1)


def _solve_threshold(s_Rn: torch.Tensor, k_R: torch.Tensor, max_iter: int = 16) -> torch.Tensor:
    """Exact LapSum threshold per row: fast piecewise iteration, closed form where it does not settle.

    Args:
        s_Rn: (R, n) scores divided by alpha.
        k_R: (R,) target sums, 0 < k < n.
    Returns:
        t_R1: (R, 1) thresholds t with sum_j F(s_j - t) = k.
    """
    t, converged = _threshold_newton(s_Rn, k_R, max_iter)
    if not bool(converged.all()):
        rest = (~converged).nonzero().squeeze(-1)
        t = t.index_put((rest,), _threshold_closed_form(s_Rn[rest], k_R[rest]).unsqueeze(-1))
    return t


def _laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    """F(x) for the standard Laplace distribution, evaluated without overflow."""
    half_exp = 0.5 * torch.exp(-x.abs())
    return torch.where(x <= 0, half_exp, 1.0 - half_exp)


def _laplace_log_cdf(x: torch.Tensor) -> torch.Tensor:
    """log F(x): x - log 2 for x < 0, log(1 - e^{-x} / 2) for x >= 0 (no cancellation)."""
    return torch.where(x < 0, x - _LOG2, torch.log1p(-0.5 * torch.exp(-x.abs())))


def _log_output_slope(x: torch.Tensor) -> torch.Tensor:
    """d log F(x) / dx = f(x) / F(x): 1 for x < 0, 1 / (2 e^x - 1) for x >= 0."""
    return torch.where(x < 0, torch.ones_like(x), 1.0 / torch.expm1(x.clamp(min=0) + _LOG2))


def _lapsum_backward(
    x_Rn: torch.Tensor, grad_out_Rn: torch.Tensor, alpha: torch.Tensor, log: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    Returns:
        grad_scores_Rn (R, n), grad_k_R (R,), grad_alpha (0-d).
    """
    log_q = torch.log_softmax(-x_Rn.abs(), dim=-1)
    q = log_q.exp()
    if log:
        v = grad_out_Rn * _log_output_slope(x_Rn)
        dy_dk = torch.exp(log_q - _laplace_log_cdf(x_Rn))
    else:
        v = grad_out_Rn * (0.5 * torch.exp(-x_Rn.abs()))
        dy_dk = q
    v_sum = v.sum(dim=-1, keepdim=True)
    grad_scores = (v - q * v_sum) / alpha
    grad_k = (grad_out_Rn * dy_dk).sum(dim=-1)
    q_dot_x = (q * x_Rn).sum(dim=-1, keepdim=True)
    grad_alpha = (v * (q_dot_x - x_Rn)).sum() / alpha
    return grad_scores, grad_k, grad_alpha


class _LapSumTopK(torch.autograd.Function):
    """p = F((r - b) / alpha) (or log p) with b the LapSum threshold; rows are (R, n)."""

    @staticmethod
    def forward(ctx, scores_Rn: torch.Tensor, k_R: torch.Tensor, alpha: torch.Tensor, log: bool):
        s = scores_Rn / alpha
        x = s - _solve_threshold(s, k_R)
        ctx.save_for_backward(x, alpha)
        ctx.log = log
        return _laplace_log_cdf(x) if log else _laplace_cdf(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, alpha = ctx.saved_tensors
        grad_scores, grad_k, grad_alpha = _lapsum_backward(x, grad_out, alpha, ctx.log)
        return (
            grad_scores if ctx.needs_input_grad[0] else None,
            grad_k if ctx.needs_input_grad[1] else None,
            grad_alpha if ctx.needs_input_grad[2] else None,
            None,
        )


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
    if scores.numel() and not bool(torch.isfinite(scores).all()):
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
