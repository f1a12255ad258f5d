"""The float32 CPU path of the soft top-k against the float64 bisection reference, both ways it runs: the C loop
(softmoe/ops/lapsum_native.py, the default where a C compiler works) and the torch passes of
softmoe/ops/lapsum_fast.py (where none does). Every test here runs on both (the `cpu_path` fixture).

Extreme rows: sharp (alpha down to 1e-3), large offsets, ties, constant rows, outliers, k near 0 and near n,
k > n / 2 (the general solver's rows), rows whose threshold lands far from the row max (re-anchored
frames), and rows whose every score is far from the threshold (the backward's softmax fallback).
Gradients are compared with the general solver run in float64.

Run: .venv/bin/python -m pytest tests/unit/ops/test_lapsum_fast.py -q
"""

from __future__ import annotations

import functools

import pytest
import torch

from softmoe.ops import lapsum as lapsum_module
from softmoe.ops import lapsum_fast, lapsum_native, soft_topk
from tests.reference.lapsum_reference import soft_topk_reference
from tests.unit.ops.native import require_native

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True, params=["native", "torch"])
def cpu_path(request, monkeypatch) -> str:
    """Run the test on the C loop ("native") and on the torch passes ("torch": as if no compiler worked)."""
    if request.param == "torch":
        monkeypatch.setattr(lapsum_native, "library", lambda: None)
    else:
        require_native()
    return request.param


def _rows(kind: str, rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    base = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    if kind == "ties":
        return base.round()
    if kind == "constant":
        return torch.full((rows, n), 3.25, dtype=torch.float64)
    if kind == "offset":
        return base + 1e6
    if kind == "outlier":
        return base.index_fill(1, torch.tensor([0]), 1e3)
    if kind == "spread":
        return base * 1e3
    return base


# (kind, n, k, alpha)
CASES = [
    ("normal", 8, 2.0, 1.0), ("normal", 8, 2.0, 0.1), ("normal", 8, 2.0, 1e-3), ("normal", 16, 1.5, 0.3),
    ("normal", 64, 2.0, 0.1), ("normal", 256, 2.0, 1.0), ("normal", 256, 2.0, 0.01), ("normal", 2, 1.0, 1.0),
    ("normal", 8, 0.01, 1.0), ("normal", 8, 7.99, 1.0), ("normal", 64, 40.0, 0.5), ("normal", 32, 16.0, 0.1),
    ("ties", 8, 2.0, 1.0), ("ties", 32, 3.0, 0.05), ("constant", 8, 2.0, 1.0), ("offset", 16, 2.0, 1e-3),
    ("offset", 64, 2.0, 1.0), ("outlier", 16, 2.0, 1.0), ("outlier", 16, 2.0, 0.1), ("spread", 16, 2.0, 1.0),
    ("spread", 64, 4.0, 0.01),
]


@functools.cache
def _case(kind: str, n: int, k: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a case and their float64 bisection reference (slow: computed once for both CPU paths)."""
    r = _rows(kind, 64, n, torch.Generator().manual_seed(n)).float()
    return r, soft_topk_reference(r.double(), k, alpha)


@pytest.mark.parametrize("kind,n,k,alpha", CASES)
def test_matches_reference_and_sums_to_k(kind, n, k, alpha):
    r, reference = _case(kind, n, k, alpha)
    p = soft_topk(r, k, alpha)
    tol = 8 * n * EPS32 * (k + 1)
    assert (p.double().sum(-1) - k).abs().max() <= tol
    torch.testing.assert_close(p.double(), reference, atol=4e-6, rtol=0)


def test_the_fast_path_solves_float32_cpu_rows(monkeypatch, cpu_path):
    calls = []
    module = lapsum_native if cpu_path == "native" else lapsum_fast
    original = module.solve
    monkeypatch.setattr(module, "solve", lambda *a: calls.append(a[0].shape if cpu_path == "torch" else a[1].shape)
                        or original(*a))
    soft_topk(torch.randn(32, 8), 2.0)
    soft_topk(torch.randn(32, 8, dtype=torch.float64), 2.0)  # float64: the general solver
    assert calls == [(32, 8)]


def test_rows_leaving_the_max_frame_are_reanchored_and_exact():
    # alpha 1e-3 puts the threshold ~1e3 alpha-units below the row max: every such row is re-anchored.
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(256, 8, generator=gen)
    r[:, 0] += 1.0
    p = soft_topk(r, 2.0, 1e-3)
    torch.testing.assert_close(p.double(), soft_topk_reference(r.double(), 2.0, 1e-3), atol=4e-6, rtol=0)


def test_mixed_blocks_of_softmax_rows_stepped_rows_and_general_rows():
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(300, 16, generator=gen)
    r[::3] *= 0.01  # flat: every p < 1/2, the softmax rows
    r[1::3] *= 10.0  # sharp: stepped rows
    k = torch.full((300,), 2.0)
    k[2::3] = 12.5  # k > n / 2: the general solver
    p = soft_topk(r, k, 1.0)
    torch.testing.assert_close(p.double(), soft_topk_reference(r.double(), k.double(), 1.0), atol=4e-6, rtol=0)


def _gradients(r, k, alpha, g, learned_alpha: bool = True):
    """(grad r, grad k, grad alpha or None). A constant alpha is the default training set-up: the C loop then
    keeps x only for rows whose sum f underflows (a learned alpha's gradient needs every x)."""
    r, k, alpha = r.clone().requires_grad_(), k.clone().requires_grad_(), alpha.clone().requires_grad_(learned_alpha)
    soft_topk(r, k, alpha).backward(g)
    return r.grad, k.grad, alpha.grad


@pytest.mark.parametrize("learned_alpha", [True, False], ids=["learned-alpha", "constant-alpha"])
@pytest.mark.parametrize("kind,n,k,alpha", CASES)
def test_gradients_match_the_general_solver(kind, n, k, alpha, learned_alpha, monkeypatch):
    # The general solver on the same float32 rows (its twin), and in float64 where the rows are not so
    # sharp that float32 x itself limits q = softmax(-|x|) (|x| in the thousands: x errs by ~1e-3 there).
    gen = torch.Generator().manual_seed(7)
    r = _rows(kind, 32, n, gen).float()
    k_R, alpha_t, g = torch.full((32,), k), torch.tensor(alpha), torch.randn(32, n, generator=gen)
    fast = _gradients(r, k_R, alpha_t, g, learned_alpha)
    monkeypatch.setattr(lapsum_module, "_backend", lambda *a: "eager")
    general = _gradients(r, k_R, alpha_t, g, learned_alpha)
    scale = 1.0 / alpha
    # Where |x| reaches hundreds, float32 x errs by ~eps |x| and q = softmax(-|x|) by as much, relatively.
    sharp = kind in ("spread", "offset") or alpha < 0.01
    atols = (2e-5 * scale, 2e-5, 2e-5 * scale * scale)
    for got, want, atol in zip(fast, general, atols):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, atol=atol, rtol=3e-3 if sharp else 1e-4)
    if not sharp:
        exact = _gradients(r.double(), k_R.double(), alpha_t.double(), g.double(), learned_alpha)
        for got, want, atol in zip(fast, exact, atols):
            if want is not None:
                torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-3)


@pytest.mark.parametrize("learned_alpha", [True, False], ids=["learned-alpha", "constant-alpha"])
def test_gradients_where_sum_f_straddles_float32s_smallest_normals(learned_alpha):
    # One score offset by 130..170 over two others, k = 1: every |x| is ~65-85, so sum f = sum e^{-|x|} / 2 runs
    # from normal to subnormal float32 (the backward's cut is FLT_MIN / eps ~ 1e-31). Rows past the cut are
    # redone in the softmax form from x, which the C loop leaves to the general solver for exactly those rows.
    offsets = torch.linspace(130.0, 170.0, 81)
    r = torch.stack([offsets, torch.zeros(81), torch.full((81,), -1.0)], dim=-1)
    k_R, alpha_t = torch.ones(81), torch.tensor(1.0)
    g = torch.randn(81, 3, generator=torch.Generator().manual_seed(3))
    got = _gradients(r, k_R, alpha_t, g, learned_alpha)
    want = _gradients(r.double(), k_R.double(), alpha_t.double(), g.double(), learned_alpha)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-3)


def test_backward_of_rows_far_from_their_threshold_stays_finite_and_exact():
    # k = 2 with two scores 400 alpha-units above the rest: every |x| is ~200, so sum f underflows and the
    # backward takes the softmax form for these rows.
    r = torch.tensor([[400.0, 400.0, 0.0, 0.0, -1.0], [1.0, 0.5, 0.0, -0.5, -1.0]]).requires_grad_()
    k = torch.tensor([2.0, 2.0]).requires_grad_()
    g = torch.tensor([[1.0, -2.0, 3.0, 0.5, 1.0], [0.3, 0.1, -0.2, 0.4, 1.0]])
    soft_topk(r, k, 1.0).backward(g)
    r64, k64 = r.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    soft_topk(r64, k64, 1.0).backward(g.double())
    assert torch.isfinite(r.grad).all() and torch.isfinite(k.grad).all()
    torch.testing.assert_close(r.grad.double(), r64.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(k.grad.double(), k64.grad, atol=1e-6, rtol=1e-4)


def test_side_sums_have_no_cancellation(cpu_path):
    if cpu_path == "native":
        pytest.skip("a helper of the torch passes: run once, under cpu_path=torch")
    x = torch.tensor([[-30.0, -0.5, 0.0, 2.0, -0.0]])
    count, log_below, log_above, unsafe, (near_below, near_above) = lapsum_fast.side_sums(x)
    assert count.item() == 2.0  # -0.0 and 0.0 count above: F(0) = 1/2 on either side
    torch.testing.assert_close(log_below.exp(), torch.tensor([[torch.exp(torch.tensor(-30.0)) + 0.6065306597]]))
    torch.testing.assert_close(log_above.exp(), torch.tensor([[2.0 + 0.1353352832]]))
    assert not unsafe.any()
    torch.testing.assert_close(near_below, torch.tensor([[0.6065306597]]))
    torch.testing.assert_close(near_above, torch.tensor([[1.0]]))


def test_output_is_not_the_saved_tensor():
    # p is returned, f is saved for the backward: editing p in place must not change the gradient.
    r = torch.randn(4, 8).mul_(0.01).requires_grad_()  # flat rows: p = f for every entry
    p = soft_topk(r, 2.0)
    g = torch.randn(4, 8)
    expected = torch.autograd.grad(soft_topk(r, 2.0), r, g)[0]
    torch.testing.assert_close(torch.autograd.grad(p, r, g)[0], expected)


def test_general_path_is_the_float64_twin(monkeypatch):
    # The general solver on the same float32 rows gives the same p to float32 rounding.
    r = torch.randn(64, 32)
    fast = soft_topk(r, 3.0, 0.2)
    monkeypatch.setattr(lapsum_module, "_backend", lambda *a: "eager")
    torch.testing.assert_close(soft_topk(r, 3.0, 0.2), fast, atol=2e-6, rtol=0)
