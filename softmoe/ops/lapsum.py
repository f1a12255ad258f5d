"""LapSum soft top-k: a differentiable relaxation of top-k selection with an exact threshold.

Struski et al., "LapSum - One Method to Differentiate Them All" (ICML 2025). For one row of
scores r (n entries) and a real 0 < k < n, the threshold b solves

    sum_i F((r_i - b) / alpha) = k,        F = Laplace(0, 1) CDF,

and the soft top-k weights are p_i = F((r_i - b) / alpha) in (0, 1), summing to k exactly.
Smaller alpha is harder: alpha -> 0 gives the 0/1 indicator of the k largest scores.

Shape legend (rows are flattened leading dims):
    R   rows (one row = one token's router scores)
    n   entries per row (experts)

The threshold is found in closed form, O(n log n) per row, no iteration (see `_solve_threshold`).
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


def _solve_threshold(s_Rn: torch.Tensor, k_R: torch.Tensor) -> torch.Tensor:
    """Exact LapSum threshold t (in units of alpha) for each row.

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
    x_Rn: torch.Tensor, v_Rn: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Implicit-function gradients of y = g(F(x)) through the threshold constraint sum F(x) = k.

    With f = F'(x) = e^{-|x|} / 2, S = sum f and q = f / S = softmax(-|x|):
        dL/dr = (v - q * sum v) / alpha,  dL/dk = sum v / S,  dL/dalpha = sum v (<q, x> - x) / alpha,
    where v = upstream gradient times dy/dx (g * f for p, g * f / p for log p).

    Args:
        x_Rn: (R, n) saved (r - b) / alpha.
        v_Rn: (R, n) upstream gradient already multiplied by the output's slope in x.
        alpha: 0-d temperature.
    Returns:
        grad_scores_Rn (R, n), grad_k_R (R,), grad_alpha (0-d).
    """
    neg_abs_x = -x_Rn.abs()
    q = torch.softmax(neg_abs_x, dim=-1)
    v_sum = v_Rn.sum(dim=-1, keepdim=True)
    grad_scores = (v_Rn - q * v_sum) / alpha
    # 1 / S = 2 exp(-logsumexp(-|x|)): stable even when every f underflows.
    inv_s = 2.0 * torch.exp(-torch.logsumexp(neg_abs_x, dim=-1, keepdim=True))
    grad_k = (v_sum * inv_s).squeeze(-1)
    q_dot_x = (q * x_Rn).sum(dim=-1, keepdim=True)
    grad_alpha = (v_Rn * (q_dot_x - x_Rn)).sum() / alpha
    return grad_scores, grad_k, grad_alpha


class _LapSumTopK(torch.autograd.Function):
    """p = F((r - b) / alpha) (or log p) with b the LapSum threshold; rows are (R, n)."""

    @staticmethod
    def forward(ctx, scores_Rn: torch.Tensor, k_R: torch.Tensor, alpha: torch.Tensor, log: bool):
        s = scores_Rn / alpha
        x = s - _solve_threshold(s, k_R).unsqueeze(-1)
        ctx.save_for_backward(x, alpha)
        ctx.log = log
        return _laplace_log_cdf(x) if log else _laplace_cdf(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, alpha = ctx.saved_tensors
        slope = _log_output_slope(x) if ctx.log else 0.5 * torch.exp(-x.abs())
        grad_scores, grad_k, grad_alpha = _lapsum_backward(x, grad_out * slope, alpha)
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
    return torch.as_tensor(alpha, device=device).to(dtype)


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
