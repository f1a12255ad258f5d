"""Unit tests of the LapSum soft top-k op against the float64 bisection reference.

Run: .venv/bin/python -m pytest tests/unit/ops/test_lapsum.py -q
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from softmoe.ops import log_soft_topk, soft_topk
from softmoe.ops.lapsum import _initial_threshold, _refine, _threshold_closed_form
from tests.reference.lapsum_reference import hard_topk_mask, soft_topk_reference

# (rows, n, k, alpha, score scale)
VALUE_CASES = [
    (16, 2, 1.0, 1.0, 1.0),
    (16, 8, 2.0, 1.0, 1.0),
    (16, 8, 1.5, 0.3, 3.0),
    (16, 8, 0.01, 1.0, 1.0),
    (16, 8, 7.99, 1.0, 1.0),
    (16, 64, 4.0, 0.1, 1.0),
    (16, 64, 62.5, 0.5, 10.0),
    (8, 256, 2.0, 1.0, 100.0),
    (4, 1024, 17.3, 2.0, 1.0),
    (16, 8, 3.0, 1.0, 1e4),
]


def _scores(rows: int, n: int, scale: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("rows,n,k,alpha,scale", VALUE_CASES)
def test_matches_bisection_reference_to_1e9(rows, n, k, alpha, scale):
    scores = _scores(rows, n, scale)
    p = soft_topk(scores, k, alpha)
    ref = soft_topk_reference(scores, k, alpha)
    torch.testing.assert_close(p, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(p.sum(-1), torch.full((rows,), k, dtype=torch.float64), atol=1e-9, rtol=0)


def test_per_row_fractional_k_and_leading_dims():
    scores = _scores(3 * 5, 16, 2.0).reshape(3, 5, 16)
    k = torch.linspace(0.3, 15.2, 15, dtype=torch.float64).reshape(3, 5)
    p = soft_topk(scores, k, 0.7)
    assert p.shape == scores.shape
    torch.testing.assert_close(p.sum(-1), k, atol=1e-10, rtol=0)
    for i in range(3):
        for j in range(5):
            ref = soft_topk_reference(scores[i, j : j + 1], k[i, j].item(), 0.7)
            torch.testing.assert_close(p[i, j : j + 1], ref, atol=1e-9, rtol=0)


def test_k_broadcasts_from_trailing_shape():
    scores = _scores(12, 8, 1.0).reshape(3, 4, 8)
    k = torch.tensor([1.0, 2.0, 3.0, 4.5], dtype=torch.float64)  # broadcast over the first dim
    torch.testing.assert_close(soft_topk(scores, k).sum(-1), k.expand(3, 4), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dim", [0, 1, -1, -2])
def test_any_dim_equals_moving_it_last(dim):
    scores = _scores(4 * 6, 5, 1.0).reshape(4, 6, 5)
    p = soft_topk(scores, 2.5, 0.5, dim=dim)
    expected = soft_topk(scores.movedim(dim, -1), 2.5, 0.5).movedim(-1, dim)
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(p.sum(dim), torch.full_like(p.sum(dim), 2.5), atol=1e-10, rtol=0)


def test_monotone_in_scores():
    scores = _scores(64, 32, 2.0)
    p = soft_topk(scores, 5.0, 0.8)
    order = scores.argsort(-1)
    p_sorted = p.gather(-1, order)
    assert (p_sorted.diff(dim=-1) >= -1e-15).all()


def test_raising_one_score_raises_its_weight():
    scores = _scores(1, 10, 1.0)
    p0 = soft_topk(scores, 3.0)
    bumped = scores.clone()
    bumped[0, 4] += 0.5
    p1 = soft_topk(bumped, 3.0)
    assert p1[0, 4] > p0[0, 4]
    others = torch.ones(10, dtype=torch.bool)
    others[4] = False
    assert (p1[0, others] <= p0[0, others] + 1e-15).all()


@pytest.mark.parametrize("k", [1, 2, 5])
def test_small_alpha_approaches_hard_topk(k):
    scores = _scores(32, 12, 1.0)
    hard = hard_topk_mask(scores, k)
    errors = [(soft_topk(scores, float(k), alpha) - hard).abs().max().item() for alpha in (1.0, 0.1, 1e-2, 1e-4)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-6


def test_large_alpha_approaches_uniform():
    scores = _scores(8, 10, 1.0)
    torch.testing.assert_close(soft_topk(scores, 3.0, 1e6), torch.full_like(scores, 0.3), atol=1e-6, rtol=0)


def test_shift_invariance():
    scores = _scores(8, 10, 1.0)
    torch.testing.assert_close(soft_topk(scores + 123.0, 3.0), soft_topk(scores, 3.0), atol=1e-12, rtol=0)


def test_ties_give_equal_weights():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    p = soft_topk(scores, 2.0, 0.2)
    assert p[0, 0] == p[0, 1] == p[0, 2]
    torch.testing.assert_close(p, soft_topk_reference(scores, 2.0, 0.2), atol=1e-9, rtol=0)


def test_iteration_agrees_with_closed_form_including_fallback_rows():
    gen = torch.Generator().manual_seed(3)
    # Huge spreads with k near n force some rows past the iteration cap into the closed form.
    s = torch.randn(256, 64, generator=gen, dtype=torch.float64) * torch.logspace(-2, 3, 256, dtype=torch.float64)[:, None]
    s = s - s.amax(-1, keepdim=True)
    k = torch.rand(256, generator=gen, dtype=torch.float64) * 63.0 + 0.5
    w = 64.0 - k
    x_iter, converged = _refine(s, s - _initial_threshold(s, k[:, None], w[:, None]), w[:, None], torch.tensor(1.0, dtype=s.dtype), 64, early_exit=True)
    t_iter = (s - x_iter)[:, :1]
    t_closed = _threshold_closed_form(s, w[:, None])
    p_iter = soft_topk(s, k, 1.0)
    ref = soft_topk_reference(s, k, 1.0)
    torch.testing.assert_close(p_iter, ref, atol=1e-9, rtol=0)
    assert converged.float().mean() > 0.9
    torch.testing.assert_close(t_iter[converged], t_closed[converged], atol=1e-9, rtol=1e-12)


# ---------------------------------------------------------------- gradients


def _grad_inputs(rows=4, n=6, seed=1):
    scores = _scores(rows, n, 1.5, seed).requires_grad_()
    k = torch.linspace(0.7, n - 0.9, rows, dtype=torch.float64).requires_grad_()
    alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    return scores, k, alpha


@pytest.mark.parametrize("fn", [soft_topk, log_soft_topk], ids=["soft_topk", "log_soft_topk"])
def test_gradcheck_scores_k_alpha(fn):
    scores, k, alpha = _grad_inputs()
    assert torch.autograd.gradcheck(lambda s, kk, a: fn(s, kk, a), (scores, k, alpha))


@pytest.mark.parametrize("fn", [soft_topk, log_soft_topk], ids=["soft_topk", "log_soft_topk"])
def test_gradcheck_along_dim0_with_one_k(fn):
    scores = _scores(5, 3, 1.0, seed=2).requires_grad_()  # rows along dim 1
    k = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)  # one k for all rows
    assert torch.autograd.gradcheck(lambda s, kk: fn(s, kk, 0.9, dim=0), (scores, k))


def test_gradient_identities():
    """Sum of score gradients is zero (shift invariance); dL/dk of sum(p) is 1 per row."""
    scores, k, alpha = _grad_inputs(rows=3, n=7)
    p = soft_topk(scores, k, alpha)
    p.sum().backward()
    torch.testing.assert_close(scores.grad, torch.zeros_like(scores), atol=1e-12, rtol=0)
    torch.testing.assert_close(k.grad, torch.ones_like(k), atol=1e-12, rtol=0)
    assert abs(alpha.grad.item()) < 1e-12


def test_gradients_finite_when_far_from_threshold():
    # Integer k with huge gaps: every f underflows; gradients must be 0 or finite, never NaN.
    scores = torch.tensor([[0.0, 1e4, 2e4, -1e4]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    p = soft_topk(scores, k, 1.0)
    (p * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(k.grad).all()


# ---------------------------------------------------------------- log p


def test_log_soft_topk_matches_log_where_representable():
    scores = _scores(16, 12, 2.0)
    torch.testing.assert_close(log_soft_topk(scores, 3.0, 0.5), soft_topk(scores, 3.0, 0.5).log(), atol=1e-10, rtol=1e-10)


def test_log_soft_topk_finite_where_p_underflows():
    scores = torch.tensor([[0.0, 1000.0, 2000.0]], dtype=torch.float64)
    assert soft_topk(scores, 1.5, 1.0)[0, 0] == 0.0
    log_p = log_soft_topk(scores, 1.5, 1.0)
    assert torch.isfinite(log_p).all()
    assert log_p[0, 0] < -1000.0


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs(dtype):
    scores = _scores(32, 16, 1.0, dtype=dtype).requires_grad_()
    p = soft_topk(scores, 3.0, 0.5)
    assert p.dtype == dtype
    ref = soft_topk_reference(scores.detach().double(), 3.0, 0.5)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(p.double(), ref, atol=tol, rtol=0)
    p.float().pow(2).sum().backward()
    assert scores.grad.dtype == dtype and torch.isfinite(scores.grad.float()).all()


def test_float32_k_parameter_with_float64_scores():
    k = torch.nn.Parameter(torch.tensor(2.0))
    p = soft_topk(_scores(4, 8, 1.0), k)
    p[:, 0].sum().backward()
    assert k.grad is not None and k.grad.dtype == torch.float32


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0.0), r"k=0\.0 must satisfy 0 < k < n=8"),
        (dict(k=-1.0), r"k=-1\.0"),
        (dict(k=8.0), r"k=8\.0 must satisfy 0 < k < n=8"),
        (dict(k=float("nan")), r"k=nan"),
        (dict(k=torch.tensor([1.0, 9.0, 1.0, 1.0])), r"k=9\.0"),
        (dict(k=torch.ones(3)), r"k of shape \(3,\) does not broadcast"),
        (dict(k=2.0, alpha=0.0), r"alpha=0\.0 must be a finite number > 0"),
        (dict(k=2.0, alpha=-0.5), r"alpha=-0\.5"),
        (dict(k=2.0, alpha=float("inf")), r"alpha=inf"),
        (dict(k=2.0, alpha=torch.ones(2)), r"alpha must be a float or a 0-d tensor, got shape \(2,\)"),
        (dict(k=2.0, dim=2), r"dim=2 is out of range"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_topk(_scores(4, 8, 1.0), **kwargs)


@pytest.mark.parametrize("k", [0.0, -1.0, 8.0, 9.5, float("nan"), float("inf"), 1e-14])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.float64])
def test_one_k_as_a_tensor_is_refused_as_the_number_is(k, dtype, scores_dtype):
    # A single-element float32/float64/int k is checked as a Python number (one host read), a half one in its own
    # dtype, as every k tensor is: the same refusals, the same message.
    if dtype == torch.int64 and not math.isfinite(k):
        return
    tensor_k = torch.tensor(k).to(dtype)
    scores = _scores(4, 8, 1.0, dtype=scores_dtype)
    with pytest.raises(ValueError) as as_number:
        soft_topk(scores, float(tensor_k))
    for shaped in (tensor_k, tensor_k.reshape(1)):
        with pytest.raises(ValueError) as as_tensor:
            soft_topk(scores, shaped)
        assert str(as_tensor.value) == str(as_number.value)


def test_half_k_is_compared_in_its_own_dtype():
    # n = 2049 is 2048 in float16: a float16 k = 2048 is not below it there, so it is refused (as a (R,) k is).
    scores = torch.randn(3, 2049)
    for k in (torch.tensor(2048.0, dtype=torch.float16), torch.full((3,), 2048.0, dtype=torch.float16)):
        with pytest.raises(ValueError, match=r"k=2048\.0 must satisfy 0 < k < n=2049"):
            soft_topk(scores, k)


def test_one_k_is_checked_with_no_rows_as_a_float_k_is():
    for k in (0.24975, torch.tensor(0.24975, dtype=torch.float64)):
        with pytest.raises(ValueError, match="is below"):
            soft_topk(torch.randn(0, 4096), k)


def test_inference_gives_the_training_forward_bitwise():
    # Without gradients the float32 CPU path solves without an autograd node: the same p, bit for bit.
    scores = torch.randn(300, 32) * torch.logspace(-2, 2, 300).unsqueeze(-1)
    k = torch.full((300,), 1.5)
    trained = soft_topk(scores.clone().requires_grad_(), k, 1.0).detach()
    with torch.no_grad():
        assert torch.equal(soft_topk(scores, k, 1.0), trained)
        assert torch.equal(soft_topk(scores.T, k, 1.0, dim=0), trained.T)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_rejected(bad):
    scores = _scores(4, 8, 1.0)
    scores[2, 3] = bad
    with pytest.raises(ValueError, match=rf"scores must be finite, found {bad}"):
        soft_topk(scores, 2.0)


@pytest.mark.parametrize("shape", [(4, 1), (4, 0), (0,)])
def test_fewer_than_two_entries_rejected(shape):
    with pytest.raises(ValueError, match=r"at least 2 entries along dim"):
        soft_topk(torch.zeros(shape), 0.5)


@pytest.mark.parametrize(
    "scores,k,alpha",
    [(torch.zeros(4, 8, dtype=torch.long), 2.0, 1.0), ([1.0, 2.0], 1.0, 1.0), (torch.zeros(4, 8), "2", 1.0), (torch.zeros(4, 8), 2.0, None)],
)
def test_wrong_types_raise_type_error(scores, k, alpha):
    with pytest.raises(TypeError):
        soft_topk(scores, k, alpha)


def test_empty_batch_returns_empty():
    assert soft_topk(torch.zeros(0, 8), 2.0).shape == (0, 8)


def test_inputs_not_modified():
    scores = _scores(4, 8, 1.0)
    before = scores.clone()
    soft_topk(scores, 2.0, 0.3)
    assert torch.equal(scores, before)


def test_log_two_constant():
    assert math.isclose(log_soft_topk(torch.tensor([[0.0, 0.0]]), 1.0)[0, 0].item(), math.log(0.5), rel_tol=1e-6)


def test_no_host_sync_with_checks_off(monkeypatch):
    """SOFTMOE_CHECKS=off (the default for GPU tensors): forward and backward with tensor k and alpha make no
    device-to-host sync (counted on CPU by a dispatch-mode tracer); the same inputs with checks on do."""
    from tests.reference.sync_counter import SyncCounter

    scores = torch.randn(300, 16, requires_grad=True)
    k = torch.full((300,), 2.5, requires_grad=True)
    alpha = torch.tensor(0.7, requires_grad=True)
    monkeypatch.setenv("SOFTMOE_CHECKS", "off")
    with SyncCounter() as counter:
        p = soft_topk(scores, k, alpha)
        (p * torch.randn_like(p)).sum().backward()
    assert counter.count == 0, counter.ops
    torch.testing.assert_close(p.sum(-1), k.detach(), atol=1e-5, rtol=0)
    monkeypatch.setenv("SOFTMOE_CHECKS", "on")
    with SyncCounter() as counter:
        soft_topk(scores, k, alpha)
    assert counter.count > 0  # the checks (and the early-exit solver) read values on the host


def test_log_soft_topk_grad_k_with_entries_far_below_the_threshold():
    """d log p / dk = q / p stays finite and right where q underflows in float32 (|x| > ~87): float32 agrees
    with float64 on sharp rows (found by the Triton kernel's tests: log(q) of an underflowed q dropped terms)."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 12, generator=gen, dtype=torch.float64) * 60.0
    weights = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        k = torch.tensor([1.5, 2.0, 3.3, 6.0], dtype=dtype, requires_grad=True)
        out = log_soft_topk(scores.to(dtype), k, 0.5)
        (out * weights.to(dtype)).sum().backward()
        grads[dtype] = k.grad.double()
    torch.testing.assert_close(grads[torch.float32], grads[torch.float64], rtol=1e-3, atol=1e-3)


def test_compile_mode_runs_the_same_steps(monkeypatch):
    """SOFTMOE_LAPSUM=compile: the early-exit solver's row passes compiled, in the one refine loop (`_refine`),
    gives the eager op's p and gradients. torch.compile itself is replaced by a recording identity here (no
    compile cost in the suite); the compiled speed is measured by benchmarks/bench_ops.py --modes."""
    from softmoe.ops import lapsum

    compiled_names = []
    monkeypatch.setattr(lapsum, "_compiled", lambda name: compiled_names.append(name) or getattr(lapsum, name))
    calls = []
    refine = lapsum._refine
    monkeypatch.setattr(lapsum, "_refine", lambda *a, **kw: calls.append(os.environ["SOFTMOE_LAPSUM"]) or refine(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(700, 16, generator=gen) * torch.logspace(-2, 3, 700)[:, None]
    scores[0] = 0.5  # a constant row
    k = (0.3 + torch.rand(700, generator=gen) * 15.4).requires_grad_()
    upstream = torch.randn(700, 16, generator=gen)
    results = {}
    for mode in ("eager", "compile"):
        monkeypatch.setenv("SOFTMOE_LAPSUM", mode)
        s = scores.clone().requires_grad_()
        for log in (False, True):
            fn = log_soft_topk if log else soft_topk
            out = fn(s, k, 0.7)
            grads = torch.autograd.grad((out * upstream).sum(), (s, k))
            results[mode, log] = (out.detach(), *grads)
    assert "_side_pass" in compiled_names and "_start_pass" in compiled_names  # the compiled backend ran ...
    assert {"eager", "compile"} <= set(calls)  # ... and both ran the one refine loop
    for log in (False, True):
        for eager, compiled in zip(results["eager", log], results["compile", log]):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("SOFTMOE_LAPSUM", "compile")
    with pytest.raises(ValueError, match="overflows"):
        soft_topk(torch.tensor([[0.0, 3e38, -3e38]]), 1.0, 1e-3)
