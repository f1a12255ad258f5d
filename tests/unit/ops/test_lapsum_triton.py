"""The fused Triton LapSum kernels against the eager op: on CUDA when there is one, else on CPU under triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is first imported: triton decorates its
own library functions on import). The interpreter is slow: shapes are small and each case runs forward and
backward once.

Tolerances (float32): p and log p within 2e-6 absolute of the eager op (both solve the same threshold
exactly; they differ in the last bits of the side sums); sum p = k within 1e-5 * n; gradients within
1e-5 absolute + 1e-4 relative.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from softmoe.ops import log_soft_topk, soft_topk  # noqa: E402
from softmoe.ops.lapsum_triton import use_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(
        DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
        reason="no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it before triton is imported)",
    ),
    # The interpreter runs kernels in numpy: log(0) = -inf of an empty side sum is intended.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def _rows(shape, seed, scale=1.0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=gen) * scale
    if ties:  # every row has each value twice, and one row is constant
        half = shape[-1] // 2
        r[:, half: 2 * half] = r[:, :half]
        r[0] = 0.25
    return r


def _k_per_row(rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (0.3 + torch.rand(rows, generator=gen) * (n - 0.6)).double()  # fractional, across (0, n)


def _upstream(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


def _run(mode, monkeypatch, fn, scores, k, alpha):
    """Forward value, and grads of (scores, k, alpha) for a fixed random upstream gradient."""
    monkeypatch.setenv("SOFTMOE_LAPSUM", mode)
    scores = scores.to(DEVICE, copy=True).requires_grad_(True)
    k = k.to(DEVICE, copy=True).requires_grad_(True)
    alpha = torch.tensor(alpha, dtype=torch.float32, device=DEVICE, requires_grad=True)
    out = fn(scores, k, alpha)
    g = _upstream(out.shape).to(DEVICE)
    grads = torch.autograd.grad((out * g).sum(), (scores, k, alpha))
    return out.detach().cpu(), [grad.cpu() for grad in grads]


CASES = [
    # (name, shape, scale, alpha, k (None: per row), ties)
    ("router", (64, 8), 1.0, 1.0, 2.0, False),
    ("per_row_k", (33, 40), 2.0, 0.7, None, False),
    ("k_above_half", (17, 24), 1.0, 0.5, 20.5, False),
    ("ties", (16, 10), 1.0, 1.0, 3.0, True),
    ("sharp", (16, 32), 1e3, 1.0, None, False),  # |r| / alpha ~ 1e3: p is 0/1 up to a few entries
    # one score 1e3 above the rest (set below): a frame centred on the row max has rounded x near the
    # threshold by ~1e-5 (p off by ~1e-5 without re-centring); the re-centred frame keeps its digits
    ("outlier", (8, 12), 0.5, 1.0, 4.0, False),
]


@pytest.mark.parametrize("log", [False, True], ids=["p", "log_p"])
@pytest.mark.parametrize("name,shape,scale,alpha,k,ties", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_eager(monkeypatch, name, shape, scale, alpha, k, ties, log):
    scores = _rows(shape, seed=len(name), scale=scale, ties=ties)
    if name == "outlier":
        scores[:, 0] = 1e3
    rows, n = shape
    k_t = _k_per_row(rows, n, seed=1) if k is None else torch.full((rows,), k, dtype=torch.float64)
    fn = log_soft_topk if log else soft_topk

    out_t, grads_t = _run("triton", monkeypatch, fn, scores, k_t, alpha)
    out_e, grads_e = _run("eager", monkeypatch, fn, scores, k_t, alpha)

    finite = torch.isfinite(out_e)
    assert torch.equal(finite, torch.isfinite(out_t))
    torch.testing.assert_close(out_t[finite], out_e[finite], atol=2e-6, rtol=1e-5 if log else 0)
    p_t = out_t.exp() if log else out_t
    torch.testing.assert_close(p_t.double().sum(-1), k_t, atol=1e-5 * n, rtol=0)
    if log:  # grad k of log p against its analytic value (the eager op's drops terms whose q underflows)
        grads_e = (grads_e[0], _log_grad_k(out_e, _upstream(out_e.shape)), grads_e[2])
    for name_g, g_t, g_e in zip(("scores", "k", "alpha"), grads_t, grads_e):
        torch.testing.assert_close(g_t, g_e, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad {name_g}: {m}")


def _log_grad_k(log_p, g):
    """(R,) float64 sum_i g_i dlog p_i/dk = sum_i g_i q_i / p_i, q = softmax(-|x|), x recovered from log p."""
    log_p = log_p.double()
    x = torch.where(log_p < -math.log(2.0), log_p + math.log(2.0), -torch.log(-2.0 * torch.expm1(log_p)))
    log_q = torch.log_softmax(-x.abs(), dim=-1)
    return (g.double() * torch.exp(log_q - log_p)).sum(-1)


def test_scalar_k_and_partial_grads(monkeypatch):
    """A float k (no k grad) and a float alpha: only the scores' gradient is asked for."""
    scores = _rows((5, 6), seed=3).to(DEVICE)
    monkeypatch.setenv("SOFTMOE_LAPSUM", "triton")
    s = scores.clone().requires_grad_(True)
    (grad_t,) = torch.autograd.grad(soft_topk(s, 2.5, 0.5).square().sum(), s)
    monkeypatch.setenv("SOFTMOE_LAPSUM", "eager")
    s = scores.clone().requires_grad_(True)
    (grad_e,) = torch.autograd.grad(soft_topk(s, 2.5, 0.5).square().sum(), s)
    torch.testing.assert_close(grad_t, grad_e, atol=1e-5, rtol=1e-4)


def test_dispatch(monkeypatch):
    """auto: eager on CPU, Triton on CUDA; triton: forced (errors name the limit); a bad mode is named."""
    cpu = torch.zeros(4, 8)
    monkeypatch.setenv("SOFTMOE_LAPSUM", "auto")
    assert not use_triton(cpu)
    assert DEVICE == "cpu" or use_triton(cpu.to(DEVICE))
    monkeypatch.setenv("SOFTMOE_LAPSUM", "triton")
    assert use_triton(cpu.to(DEVICE))
    with pytest.raises(ValueError, match="at most 512 entries, got n=513"):
        use_triton(torch.zeros(2, 513))
    with pytest.raises(ValueError, match="float32"):
        use_triton(torch.zeros(2, 8, dtype=torch.float64))
    monkeypatch.setenv("SOFTMOE_LAPSUM", "fast")
    with pytest.raises(ValueError, match="SOFTMOE_LAPSUM='fast' must be one of"):
        soft_topk(cpu, 2.0)


def test_fused_keep_matches_relative_keep():
    """The kernel's truncation mask equals `softk.relative_keep` on the p it returns (same pass).

    Rows 0-19 have k = 2, rows 20-39 a fractional k per row; rows 0-9 and 20-29 have ties.
    """
    from softmoe.ops.lapsum_triton import lapsum_triton_keep
    from softmoe.routing.softk import relative_keep

    rows, n = 40, 16
    scores = _rows((rows, n), seed=11)
    ties = _rows((rows, n), seed=12, ties=True)
    scores[0:10], scores[20:30] = ties[0:10], ties[20:30]
    k = torch.cat([torch.full((20,), 2.0).double(), _k_per_row(20, n, seed=2).clamp(max=7.0)])
    scores, k, alpha = scores.to(DEVICE), k.to(DEVICE), torch.tensor(0.5, device=DEVICE)
    for threshold, cap_factor in [(1.8, 2.0), (0.0, 1.5), (50.0, 2.0)]:  # the paper's; clamped low; high
        p, keep = lapsum_triton_keep(scores, k.float(), (n - k).float(), alpha, False, True, (threshold, cap_factor))
        expected = relative_keep(p, k.float()[:, None], threshold, cap_factor)
        assert torch.equal(keep, expected), (threshold, cap_factor)
        assert 0 < keep.sum() < keep.numel()
    with pytest.raises(ValueError, match="needs p, not log p"):
        lapsum_triton_keep(scores, k.float(), (n - k).float(), alpha, True, True, (1.8, 2.0))


def test_kernels_compile_for_sm90(tmp_path):
    """Both kernels (log and keep branches) compile to an sm_90 cubin: the interpreter misses compile-only
    errors (e.g. a non-constexpr global read in a kernel). Runs without TRITON_INTERPRET, in a subprocess
    with its own cache (a fresh compile, nothing written to ~/.triton)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    code = ("from softmoe.ops.lapsum_triton import compile_kernels\n"
            "compiled = compile_kernels(arch=90)\n"
            "assert all(c.asm['cubin'] for c in compiled.values())\n"
            "print('compiled')")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
