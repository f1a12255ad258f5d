"""The float32 CPU path of LapSum soft top-k: the exact threshold in few, cheap passes over the rows.

The math is that of softmoe/ops/lapsum.py (its module docstring); only the passes differ. Every pass
over the [R, n] rows is memory bound, and on CPU the kernels of `where`, `heaviside`, bool reductions,
`argmin`, `sort` and `softmax` over short rows cost 5-20x an add or an exp (docs/benchmarks.md), so the
passes over [R, n] use only adds, multiplies, `sign`, `clamp`, `exp`, sums and maxima:

    1. s = (r - max r) / alpha and e^s, one exp. t0 = log sum e^s - log 2k is the threshold when every
       p < 1/2 (then p = k softmax(s)); that holds when t0 >= max s = 0, and then the row is done.
    2. The other rows take the exact piecewise steps of `lapsum_steps._interval_step` from t0 (the
       root's safe side), one pass of x = s - t each, side sums with a float sign mask. A step that
       passes no score (seen from the nearest score on each side, in the same pass) has landed on the
       root; so router rows need one or two passes. A row whose threshold moves beyond `_band(k)` from its
       frame's anchor (first the row max) is re-anchored there (`_reanchor`): x stays exact near the
       threshold however sharp the row. Rows with k > n / 2 or that do not settle in `_MAX_STEPS` go to
       the general solver (`lapsum._solve_x`, handed in by the caller).
    3. p and F'(x) = e^{-|x|} / 2 (saved for the backward) come from one exp of the final x.

Why the band is safe: s carries a relative error of ~1.5 eps, so near the threshold (s ~ t) x errs by
~1.5 eps |t|, and sum p errs by at most ~1.5 eps (n / 2) (|t| + 0.4); with |t| <= 4 (k + 1) that is
under the property tests' tolerance 8 n eps (k + 1).

Shape legend: R rows, n entries per row.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from softmoe.ops.checks import all_finite
from softmoe.ops.lapsum_steps import _check_centred, _exact_where_unsafe, _interval_step

_LOG2 = math.log(2.0)
_MAX_STEPS = 8


def _band(k_R1: torch.Tensor) -> torch.Tensor:
    """(R, 1) the largest |t| (alpha units from the row max) at which the s - t frame is exact enough."""
    return (4.0 * (k_R1 + 1.0)).clamp_(max=16.0)


def side_sums(x_Rn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """At threshold x = 0: (R, 1) count below, log L, log U, `unsafe` (as `lapsum._plain_side_sums`), and the
    (R, 1) largest e^x below and e^-x above (how close the nearest score on each side is).

    L = sum_{x<0} e^x, U = sum_{x>=0} e^-x. The mask is -1.0 below and 0.0 at or above 0 (a float sign: an x
    of -0.0 counts above, F(0) = 1/2 either way), so every per-entry term is e^{-|x|} or exactly 0: no
    cancellation.
    """
    e = x_Rn.abs().neg_().exp_()
    minus_below = torch.sign(x_Rn).clamp_(max=0.0)  # -1 where x < 0, else 0
    e_below = (e * minus_below).neg_()
    e_above = e.sub_(e_below)  # e - e = 0 below, e above (e is not needed after this)
    sum_below, sum_above = e_below.sum(dim=-1, keepdim=True), e_above.sum(dim=-1, keepdim=True)
    count = minus_below.sum(dim=-1, keepdim=True).neg_()
    finfo = torch.finfo(x_Rn.dtype)
    safe = finfo.tiny / finfo.eps
    n = x_Rn.shape[-1]
    unsafe = ((sum_below < safe) & (count > 0)) | ((sum_above < safe) & (count < n))
    nearest = (e_below.amax(dim=-1, keepdim=True), e_above.amax(dim=-1, keepdim=True))
    return count, sum_below.log_(), sum_above.log_(), unsafe, nearest


def _crosses(step_R1: torch.Tensor, nearest_below_R1: torch.Tensor, nearest_above_R1: torch.Tensor
             ) -> torch.Tensor:
    """(R, 1) whether moving the threshold by `step` passes a score (then the interval's model was not exact).

    Up by u > 0 passes the scores with x in [0, u): the nearest above has e^-x = nearest_above > e^-u. Down
    by u < 0 passes those with x in [u, 0): the nearest below has e^x = nearest_below >= e^u.
    """
    reach = step_R1.abs().neg().exp()
    return torch.where(step_R1 > 0, nearest_above_R1 > reach, nearest_below_R1 >= reach)


def _reanchor(r_Rn, s_Rn, anchor_R1, t_R1, alpha, rows) -> None:
    """Move the frame of `rows` to an anchor at their threshold: s = (r - a) / alpha with a = fl(a + alpha t).

    The anchor is a float32 number, so r - a is exact for scores near it; the threshold in the new frame is
    the rounding residual (a + alpha t - fl(...)) / alpha, computed in float64. In place.
    """
    exact = anchor_R1[rows] + alpha.double() * t_R1[rows].double()  # float64 (R', 1)
    moved = exact.to(r_Rn.dtype)
    anchor_R1[rows] = moved.double()
    t_R1[rows] = ((exact - moved.double()) / alpha.double()).to(t_R1.dtype)
    s_Rn[rows] = torch.sub(r_Rn[rows], moved).div_(alpha)


def _steps(r_Rn, s_Rn, t_R1, w_R1, band_R1, alpha, max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact piecewise steps of each row's threshold t in its frame x = s - t, from the root's safe side.

    s = (r - anchor) / alpha; the anchor starts at the row max. A step solves the threshold equation exactly
    on the current interval between scores (`lapsum_steps._interval_step`); a row is done once its step is
    below sqrt(eps), or at most 1 and passes no score (`_crosses`: it landed on the root, to a rounding of
    ~eps). Rows that are done leave the loop; a row whose threshold moved beyond `band_R1` from its anchor is
    re-anchored there (`_reanchor`), so x stays exact near the threshold. Updates s and t in place.
    Returns (x_Rn at the final thresholds, ok_R) with ok False for rows that did not settle in `max_steps`
    or whose residual threshold is beyond `band_R1` (scores too coarse for a float32 anchor).
    """
    tolerance = math.sqrt(torch.finfo(s_Rn.dtype).eps)
    anchor = r_Rn.amax(dim=-1, keepdim=True).double()
    done = torch.zeros(s_Rn.shape[0], dtype=torch.bool, device=s_Rn.device)
    active = torch.arange(s_Rn.shape[0], device=s_Rn.device)
    for _ in range(max_steps):
        s_act = s_Rn if active.numel() == s_Rn.shape[0] else s_Rn[active]
        x = s_act - t_R1[active]
        count, log_below, log_above, unsafe, nearest = side_sums(x)
        step = _interval_step(*_exact_where_unsafe(x, count, log_below, log_above, unsafe), w_R1[active])
        finite = torch.isfinite(step)
        t_R1[active] += torch.where(finite, step, 0.0)  # x - u: the threshold moves by u
        # A step that passes no score lands on the root, to its rounding: eps |u|, so only a short one is final.
        settled = (finite & ((step.abs() <= tolerance) | ((step.abs() <= 1.0) & ~_crosses(step, *nearest))))
        settled = settled.squeeze(-1)
        done[active[settled]] = True
        active = active[~settled]
        far = active[(t_R1[active].abs() > band_R1[active]).squeeze(-1)]
        if far.numel():
            _reanchor(r_Rn, s_Rn, anchor, t_R1, alpha, far)
        if not active.numel():
            break
    outside = (done & (t_R1.abs() > band_R1).squeeze(-1)).nonzero().squeeze(-1)
    if outside.numel():  # settled far from the anchor: take x in a frame at the threshold
        _reanchor(r_Rn, s_Rn, anchor, t_R1, alpha, outside)
    return s_Rn.sub_(t_R1), (done & (t_R1.abs() <= band_R1).squeeze(-1))


def solve(r_Rn: torch.Tensor, k_R1: torch.Tensor, w_R1: torch.Tensor, alpha: torch.Tensor,
          x_Rn: torch.Tensor, f_Rn: torch.Tensor, p_Rn: torch.Tensor, general_solver: Callable) -> None:
    """Write x = (r - b) / alpha at the exact threshold b, f = F'(x) = e^{-|x|} / 2 and p = F(x) into the
    given (R, n) float32 buffers (no copies: on CPU a copy costs as much as a pass of the solve).

    Rows whose frame would lose digits go to `general_solver(r, k, w, alpha) -> x` (the general solver,
    `lapsum._solve_x`); see the module docstring.
    """
    s = torch.sub(r_Rn, r_Rn.amax(dim=-1, keepdim=True), out=x_Rn)
    if float(alpha) != 1.0:  # a host read, free on CPU: saves a pass at the paper's alpha
        s.div_(alpha)
    _check_centred(all_finite(s), s, alpha)
    # All p < 1/2 (every score below the threshold): t = log sum e^s - log 2k exactly, p = e^s / (2 e^t);
    # otherwise t is above the root, on its safe side, and the row takes exact steps from there.
    e_s = torch.exp(s, out=f_Rn)
    sum_e = e_s.sum(dim=-1, keepdim=True)
    t = sum_e.log().sub_(k_R1.log() + _LOG2)
    # Every row done (t >= 0, and k <= w: no row for the general solver)? Two reductions and two host reads:
    # the common case costs few operators (each one a call, which is what a decode step of one row pays for).
    if not t.numel() or (t.amin().item() >= 0 and (k_R1 - w_R1).amax().item() <= 0):
        x = s.sub_(t)
        e_s.mul_(k_R1 / sum_e)  # = e^x / 2 = p = f
        p_Rn.copy_(e_s)
        return
    general = (k_R1 > w_R1).squeeze(-1)
    stepped = ((t < 0).squeeze(-1) & ~general).nonzero().squeeze(-1)
    if 2 * stepped.numel() > s.shape[0]:
        # Most rows step: all do (no row copies). A row already at its root settles in one step (u ~ 0).
        x, ok = _steps(r_Rn, s, t, w_R1, _band(k_R1), alpha, _MAX_STEPS)
        general |= ~ok
    elif stepped.numel():
        x_rows, ok = _steps(r_Rn[stepped], s[stepped], t[stepped], w_R1[stepped], _band(k_R1[stepped]), alpha,
                            _MAX_STEPS)
        x = s.sub_(t)
        x[stepped] = x_rows
        general[stepped[~ok]] = True
    else:
        x = s.sub_(t)
    if bool(general.any()):
        rows = general.nonzero().squeeze(-1)
        x[rows] = general_solver(r_Rn[rows], k_R1[rows], w_R1[rows], alpha)
    outputs_from_x(x, f_Rn, p_Rn)


def outputs_from_x(x_Rn: torch.Tensor, f_Rn: torch.Tensor, p_Rn: torch.Tensor) -> None:
    """f = F'(x) = e^{-|x|} / 2 and p = F(x) from x (R, n), written into f and p (float masks: no bool kernels)."""
    e = torch.abs(x_Rn, out=f_Rn).neg_().exp_()
    # p = F(x) = e / 2 below 0, 1 - e / 2 at or above, as above (1 - e) + e / 2 with above a float 0/1.
    above = torch.sign(x_Rn, out=p_Rn).clamp_(min=0.0)  # x = 0 takes e / 2 = 1/2 = F(0)
    above.addcmul_(above, e, value=-1.0).add_(e.mul_(0.5))


def backward(f_Rn: torch.Tensor, grad_out_Rn: torch.Tensor, alpha: torch.Tensor, need_k: bool,
             grad_Rn: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Implicit-function gradients of p = F(x) from the saved f = F'(x) = e^{-|x|} / 2 (`lapsum._lapsum_backward`).

    dL/dr = f (g - <q, g>) / alpha with q = f / sum f, written into `grad_Rn`; dL/dk = <q, g>. Returns
    (grad_k (R,) or None, `unsafe` (R,) bool): rows whose sum f is subnormal or 0 (every |x| beyond ~80),
    where q = f / sum f loses its digits; the caller redoes those with the softmax form.
    """
    sum_f = f_Rn.sum(dim=-1, keepdim=True)
    finfo = torch.finfo(f_Rn.dtype)
    unsafe = (sum_f < finfo.tiny / finfo.eps).squeeze(-1)
    q_dot_g = torch.linalg.vecdot(grad_out_Rn, f_Rn).unsqueeze_(-1).div_(sum_f)
    grad = torch.sub(grad_out_Rn, q_dot_g, out=grad_Rn).mul_(f_Rn)
    if float(alpha) != 1.0:
        grad.div_(alpha)
    return (q_dot_g.squeeze(-1) if need_k else None), unsafe
