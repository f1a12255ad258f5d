"""Triton kernels of the fused LapSum soft top-k (imported lazily by softmoe/ops/lapsum_triton.py).

This module imports triton at the top: only `lapsum_triton` imports it, and only when the Triton path
is taken, so importing softmoe never imports triton. The math is the eager op's (softmoe/ops/lapsum.py),
row by row in registers: a program owns BLOCK_R rows of BLOCK_E >= n entries (padding masked).

Shape legend: R rows, n entries per row (n <= BLOCK_E, a power of two).
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOG2 = tl.constexpr(0.6931471805599453)  # a global read by a kernel must be a constexpr


@triton.jit
def _logaddexp(a, b):
    """log(e^a + e^b), -inf when both are -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    hi_safe = tl.where(hi == -float("inf"), 0.0, hi)
    return tl.where(hi == -float("inf"), -float("inf"), hi_safe + tl.log(1.0 + tl.exp(lo - hi_safe)))


@triton.jit
def _masked_logsumexp(v, keep):
    """(BLOCK_R,) log sum_{keep} e^v along axis 1; -inf where no entry is kept."""
    v = tl.where(keep, v, -float("inf"))
    top = tl.max(v, axis=1)
    top_safe = tl.where(top == -float("inf"), 0.0, top)
    total = tl.sum(tl.where(keep, tl.exp(v - top_safe[:, None]), 0.0), axis=1)
    return tl.where(top == -float("inf"), -float("inf"), top_safe + tl.log(total))


@triton.jit
def _log1p_small(z):
    """log(1 + z) for z in (-1/2, 0], without the cancellation of log(1 + z) for tiny z.

    u = 1 + z rounded; log u * z / (u - 1) corrects the rounding of u (exact to a few ulps).
    """
    u = 1.0 + z
    u_minus_1 = u - 1.0
    return tl.where(u_minus_1 == 0.0, z, tl.log(u) * (z / tl.where(u_minus_1 == 0.0, 1.0, u_minus_1)))


@triton.jit
def _recentred(r, x, valid, alpha):
    """The same x = (r - b) / alpha recomputed around each row's score nearest the threshold.

    x = (r - r_a) / alpha + x_a: r - r_a is exact near the threshold, so x keeps its digits there
    however large |r| / alpha or an offset common to the row.
    """
    cols = tl.arange(0, x.shape[1])[None, :]
    abs_x = tl.where(valid, tl.abs(x), float("inf"))
    nearest = tl.min(abs_x, axis=1)
    # First column attaining the minimum (torch.argmin's tie rule).
    anchor = tl.min(tl.where(abs_x == nearest[:, None], cols, x.shape[1]), axis=1)
    at_anchor = cols == anchor[:, None]
    r_a = tl.sum(tl.where(at_anchor, r, 0.0), axis=1)
    x_a = tl.sum(tl.where(at_anchor, x, 0.0), axis=1)
    return (r - r_a[:, None]) / alpha + x_a[:, None]


@triton.jit
def _interval_step(x, valid, w):
    """(BLOCK_R,) the exact piecewise step u of `lapsum._interval_step` at the threshold x = 0.

    Side sums are log-sum-exps: nothing underflows into subnormals however far the scores are.
    """
    below = valid & (x < 0)
    above = valid & (x >= 0)
    neg_abs = -tl.abs(x)
    count = tl.sum(below.to(tl.float32), axis=1)
    log_below = _masked_logsumexp(neg_abs, below)
    log_above = _masked_logsumexp(neg_abs, above)
    d = w - count
    log_abs_d = tl.log(tl.abs(d))
    log_sqrt_disc = 0.5 * _logaddexp(2.0 * log_abs_d, log_below + log_above)
    log_root = _logaddexp(log_abs_d, log_sqrt_disc)
    return tl.where(d > 0, log_root - log_above, log_below - log_root)


@triton.jit
def _row_block(num_rows, n, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's rows (BLOCK_R,), which exist (BLOCK_R,), valid entries and offsets (BLOCK_R, BLOCK_E)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_rows
    valid = row_ok[:, None] & (cols[None, :] < n)
    return rows, row_ok, valid, rows[:, None].to(tl.int64) * n + cols[None, :]


@triton.jit
def lapsum_forward_kernel(
    scores_ptr, k_ptr, w_ptr, alpha_ptr, x_ptr, out_ptr, keep_ptr,
    num_rows, n, max_steps, threshold, cap_factor,
    LOG: tl.constexpr, KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """x = (r - b) / alpha and p = F(x) (or log p) for BLOCK_R rows of contiguous float32 [R, n] scores.

    1. s = (r - max r) / alpha (floored at the float32 minimum: finite, never NaN);
    2. t from `lapsum._initial_threshold` (on the root's safe side);
    3. exact piecewise steps, each in a frame re-centred on the score nearest the threshold, until every
       row of the block has a step below sqrt(eps) (the step that converges is applied), at most
       `max_steps` (the steps approach the root monotonically within about 2 min(k, n - k) + 2).
    With KEEP (p only), also the paper's truncation (`softk.relative_keep`): keep p >= tau with
    tau = clamp(threshold k / n, m-th largest p, largest p), m = min(ceil(k cap_factor), n).
    """
    rows, row_ok, valid, offsets = _row_block(num_rows, n, BLOCK_R, BLOCK_E)

    alpha = tl.load(alpha_ptr)
    r = tl.load(scores_ptr + offsets, mask=valid, other=0.0)
    k = tl.load(k_ptr + rows, mask=row_ok, other=1.0)
    w = tl.load(w_ptr + rows, mask=row_ok, other=1.0)

    f32_min = -3.4028234663852886e38
    r_max = tl.max(tl.where(valid, r, -float("inf")), axis=1)
    s = tl.maximum((r - r_max[:, None]) / alpha, f32_min)
    s = tl.where(valid, s, 0.0)

    # Safe-side start: all scores below t (k <= n/2) or all above (k > n/2).
    from_above = tl.log(tl.sum(tl.where(valid, tl.exp(s), 0.0), axis=1)) - (tl.log(k) + _LOG2)
    from_below = (tl.log(w) + _LOG2) - _masked_logsumexp(-s, valid)
    t = tl.where(k > w, from_below, from_above)
    x = s - t[:, None]

    tolerance = 3.4526698300124393e-04  # sqrt(float32 eps)
    step_index = 0
    unconverged = 1
    while (step_index < max_steps) & (unconverged > 0):
        if step_index > 0:  # the start is a frame centred on the row max already
            x = _recentred(r, x, valid, alpha)
        step = _interval_step(x, valid, w)
        finite = (step == step) & (tl.abs(step) < float("inf"))
        x = x - tl.where(finite, step, 0.0)[:, None]
        done = (finite & (tl.abs(step) <= tolerance)) | (~row_ok)
        unconverged = tl.sum((~done).to(tl.int32), axis=0)
        step_index += 1

    tl.store(x_ptr + offsets, x, mask=valid)
    half_e = 0.5 * tl.exp(-tl.abs(x))
    if LOG:
        out = tl.where(x < 0, x - _LOG2, _log1p_small(-half_e))
    else:
        out = tl.where(x < 0, half_e, 1.0 - half_e)
    tl.store(out_ptr + offsets, out, mask=valid)
    if KEEP:
        p = tl.where(valid, out, -1.0)  # padding sorts below every p
        p_desc = tl.sort(p, dim=1, descending=True)
        m = tl.minimum(tl.maximum(tl.ceil(k * cap_factor), 1.0), n * 1.0).to(tl.int32)
        cols = tl.arange(0, BLOCK_E)[None, :]
        p_m = tl.sum(tl.where(cols == m[:, None] - 1, p_desc, 0.0), axis=1)
        tau = tl.minimum(tl.maximum(threshold * k / n, p_m), tl.max(p, axis=1))
        tl.store(keep_ptr + offsets, p >= tau[:, None], mask=valid)


@triton.jit
def lapsum_backward_kernel(
    x_ptr, grad_out_ptr, alpha_ptr, grad_scores_ptr, grad_k_ptr, grad_alpha_ptr,
    num_rows, n,
    LOG: tl.constexpr, NEED_K: tl.constexpr, NEED_ALPHA: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """`lapsum._lapsum_backward` for BLOCK_R rows: grad scores [R, n], grad k [R], grad alpha per row [R].

    With f = e^{-|x|} / 2, q = softmax(-|x|), v = g dy/dx:
    dL/dr = (v - q sum v) / alpha, dL/dk = sum g dy/dk (dp/dk = q, dlog p/dk = q / p),
    dL/dalpha (this row's part) = sum v (<q, x> - x) / alpha.
    """
    rows, row_ok, valid, offsets = _row_block(num_rows, n, BLOCK_R, BLOCK_E)

    alpha = tl.load(alpha_ptr)
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
    g = tl.load(grad_out_ptr + offsets, mask=valid, other=0.0)

    neg_abs = tl.where(valid, -tl.abs(x), -float("inf"))
    log_total = _masked_logsumexp(neg_abs, valid)
    log_q = neg_abs - log_total[:, None]
    q = tl.where(valid, tl.exp(log_q), 0.0)
    if LOG:
        slope = tl.where(x < 0, 1.0, 1.0 / (2.0 * tl.exp(tl.maximum(x, 0.0)) - 1.0))
        v = tl.where(valid, g * slope, 0.0)
    else:
        v = tl.where(valid, g * 0.5 * tl.exp(neg_abs), 0.0)
    v_sum = tl.sum(v, axis=1)
    grad_scores = (v - q * v_sum[:, None]) / alpha
    tl.store(grad_scores_ptr + offsets, grad_scores, mask=valid)
    if NEED_K:
        if LOG:
            log_p = tl.where(x < 0, x - _LOG2, _log1p_small(-0.5 * tl.exp(neg_abs)))
            dy_dk = tl.where(valid, tl.exp(log_q - log_p), 0.0)
        else:
            dy_dk = q
        tl.store(grad_k_ptr + rows, tl.sum(g * dy_dk, axis=1), mask=row_ok)
    if NEED_ALPHA:
        q_dot_x = tl.sum(q * x, axis=1)
        part = tl.sum(tl.where(valid, v * (q_dot_x[:, None] - x), 0.0), axis=1) / alpha
        tl.store(grad_alpha_ptr + rows, part, mask=row_ok)
