"""Slow, independent references for the LapSum soft top-k, written for the tests only.

The threshold is found by plain bisection in float64 on the monotone function
b -> sum_i F((r_i - b) / alpha), with no sorting, no closed form and no Newton steps.
"""

from __future__ import annotations

import torch


def laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard Laplace CDF, elementwise, float64."""
    return torch.where(x <= 0, 0.5 * torch.exp(x.clamp(max=0)), 1.0 - 0.5 * torch.exp(-x.clamp(min=0)))


def bisect_threshold(scores_Rn: torch.Tensor, k_R: torch.Tensor, alpha: float, iters: int = 200) -> torch.Tensor:
    """(R,) thresholds b with sum_i F((r_i - b) / alpha) = k, by bisection in float64."""
    r = scores_Rn.double()
    k = k_R.double()
    # sum F is n at b = -inf and 0 at b = +inf; these brackets leave a tail mass far below any k tested.
    margin = alpha * 60.0
    lo = r.amin(-1) - margin
    hi = r.amax(-1) + margin
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        total = laplace_cdf((r - mid.unsqueeze(-1)) / alpha).sum(-1)
        too_many = total > k  # threshold must move up
        lo = torch.where(too_many, mid, lo)
        hi = torch.where(too_many, hi, mid)
    return 0.5 * (lo + hi)


def soft_topk_reference(scores_Rn: torch.Tensor, k, alpha: float) -> torch.Tensor:
    """(R, n) float64 soft top-k weights along the last dim."""
    r = scores_Rn.double()
    k_R = torch.as_tensor(k, dtype=torch.float64).expand(r.shape[:-1]).reshape(-1)
    b = bisect_threshold(r.reshape(-1, r.shape[-1]), k_R, alpha)
    return laplace_cdf((r.reshape(-1, r.shape[-1]) - b.unsqueeze(-1)) / alpha).reshape(r.shape)


def hard_topk_mask(scores_Rn: torch.Tensor, k: int) -> torch.Tensor:
    """(R, n) 0/1 indicator of the k largest entries of each row."""
    idx = scores_Rn.topk(k, dim=-1).indices
    return torch.zeros_like(scores_Rn).scatter(-1, idx, 1.0)
