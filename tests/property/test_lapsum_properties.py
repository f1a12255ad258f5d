"""Property tests (hypothesis) of the LapSum soft top-k and the truncation into the routing format.

Run: .venv/bin/python -m pytest tests/property -q
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softmoe.ops import log_soft_topk, soft_topk
from softmoe.ops.lapsum import smallest_k
from softmoe.routing import truncate
from tests.reference.lapsum_reference import soft_topk_reference

PROFILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def score_rows(draw, max_n: int = 1024):
    """(rows, n) float64 scores with a random scale up to 1e4, optional ties, and a valid k per row."""
    n = draw(st.integers(min_value=2, max_value=max_n))
    rows = draw(st.integers(min_value=1, max_value=max(1, min(8, 4096 // n))))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3, 1e4]))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, n, generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()):  # ties: quantise hard so many entries coincide
        scores = (scores / scale * 2).round() * scale
    k_kind = draw(st.sampled_from(["near0", "near_n", "integer", "uniform"]))
    frac = torch.rand(rows, generator=gen, dtype=torch.float64)
    k = {
        "near0": 1e-6 + frac * 1e-3,
        "near_n": n - 1e-6 - frac * 1e-3,
        "integer": torch.randint(1, n, (rows,), generator=gen).double(),
        "uniform": 1e-3 + frac * (n - 2e-3),
    }[k_kind]
    alpha = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    return scores, k, alpha


@PROFILE
@given(score_rows())
def test_weights_in_unit_interval_and_sum_to_k(case):
    scores, k, alpha = case
    p = soft_topk(scores, k, alpha)
    assert torch.isfinite(p).all()
    assert (p >= 0).all() and (p <= 1).all()
    torch.testing.assert_close(p.sum(-1), k, atol=1e-9 * scores.shape[-1], rtol=1e-12)


@PROFILE
@given(score_rows(max_n=256))
def test_matches_reference(case):
    scores, k, alpha = case
    p = soft_topk(scores, k, alpha)
    # p is only determined up to its conditioning: one ulp of r_i moves x_i = (r_i - b) / alpha by
    # ulp(r_i) / alpha, so |r| / alpha ~ 1e7 limits any float64 method to ~1e-9.
    conditioning = 4 * torch.finfo(torch.float64).eps * scores.abs().max().item() / alpha
    torch.testing.assert_close(p, soft_topk_reference(scores, k, alpha), atol=max(1e-9, conditioning), rtol=0)


@PROFILE
@given(score_rows())
def test_monotone_in_scores(case):
    scores, k, alpha = case
    p = soft_topk(scores, k, alpha)
    order = scores.argsort(-1)
    assert (p.gather(-1, order).diff(dim=-1) >= -1e-12).all()


@PROFILE
@given(score_rows(), st.sampled_from([soft_topk, log_soft_topk]))
def test_outputs_and_gradients_finite(case, fn):
    scores, k, alpha = case
    scores = scores.clone().requires_grad_()
    k = k.clone().requires_grad_()
    alpha_t = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    out = fn(scores, k, alpha_t)
    weights = torch.randn_like(out)
    # Weighting finite outputs only: log p of an underflowed p is a large negative, still finite.
    assert torch.isfinite(out).all()
    (out * weights).sum().backward()
    assert torch.isfinite(scores.grad).all()
    if fn is soft_topk:  # d log p / dk may legitimately overflow for p ~ 1e-300
        assert torch.isfinite(k.grad).all() and torch.isfinite(alpha_t.grad).all()


@PROFILE
@given(score_rows(max_n=64), st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_inputs_finite(case, dtype):
    scores, k, alpha = case
    scores = scores.clamp(-6e4, 6e4).to(dtype)
    k = k.clamp(min=smallest_k(scores.shape[-1], dtype))  # computed in float32: a smaller k is refused
    p = soft_topk(scores, k, alpha)
    assert p.dtype == dtype and torch.isfinite(p.float()).all()
    assert (p.float() >= 0).all() and (p.float() <= 1).all()


def test_single_entry_rows_rejected_clearly():
    with pytest.raises(ValueError, match=r"scores.shape\[dim=-1\]=1: soft top-k needs at least 2 entries"):
        soft_topk(torch.zeros(3, 1), 0.5)


@PROFILE
@given(
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=32),
    st.floats(min_value=0.0, max_value=0.9),
    st.one_of(st.none(), st.integers(min_value=1, max_value=32)),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_truncation_invariants(tokens, experts, min_weight, max_active, seed):
    if max_active is not None:
        max_active = min(max_active, experts)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(tokens, experts, generator=gen) ** 3
    routing = truncate(weights, min_weight=min_weight, max_active=max_active)
    # sorted by expert, tokens ascending within an expert
    assert (routing.expert_N.diff() >= 0).all()
    same_expert = routing.expert_N[1:] == routing.expert_N[:-1]
    assert (routing.token_N.diff()[same_expert] > 0).all()
    # counts and offsets describe the triples
    assert routing.counts_E.sum() == routing.num_pairs
    assert torch.equal(routing.counts_E, torch.bincount(routing.expert_N, minlength=experts))
    assert routing.offsets_E1[-1] == routing.num_pairs
    # every token keeps at least one expert, no more than the cap
    active = routing.active_per_token()
    assert (active >= 1).all()
    if max_active is not None:
        assert (active <= max_active).all()
    # weights are the dense entries; kept ones pass the threshold unless they are a token's best
    torch.testing.assert_close(routing.weight_N, weights[routing.token_N, routing.expert_N])
    below = routing.weight_N < min_weight
    best = weights.argmax(-1)
    assert (routing.expert_N[below] == best[routing.token_N[below]]).all()
    # nothing above the threshold is dropped unless the cap forced it
    if max_active is None:
        assert torch.equal(routing.dense_weights() > 0, (weights >= min_weight) | (torch.arange(experts) == best[:, None]))


# ---------------------------------------------------------------- exactness at extreme inputs
# sum p = k to the dtype's precision for every finite input: sharp rows (|r| / alpha up to 1e9),
# offsets up to 1e7, ties, float32 / bfloat16, and both solvers (the CPU one with its host syncs and
# the sync-free one that SOFTMOE_CHECKS=off selects). The oracle is float64 bisection on the same
# (rounded) inputs.


@st.composite
def extreme_rows(draw):
    n = draw(st.integers(min_value=2, max_value=64))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e2, 1e4, 1e6]))
    alpha = draw(st.sampled_from([1e-3, 1e-2, 1.0, 1e2]))
    offset = draw(st.sampled_from([0.0, 1e3, -1e5, 1e7]))
    scores = torch.randn(4, n, generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()):  # ties: many entries coincide
        scores = (scores / scale * 2).round() * scale
    k = draw(st.sampled_from(["integer", "uniform"]))
    k = (torch.randint(1, n, (4,), generator=gen).double() if k == "integer"
         else 1e-3 + torch.rand(4, generator=gen, dtype=torch.float64) * (n - 2e-3))
    return scores + offset, k, alpha


@pytest.mark.parametrize("checks", ["auto", "off"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=extreme_rows())
def test_sum_is_k_to_dtype_precision_at_extreme_inputs(case, dtype, checks, monkeypatch):
    monkeypatch.setenv("SOFTMOE_CHECKS", checks)
    scores, k, alpha = case
    scores = scores.to(dtype)
    k = k.clamp(min=smallest_k(scores.shape[-1], dtype))
    p = soft_topk(scores, k, alpha)
    assert p.dtype == dtype and torch.isfinite(p).all()
    n = scores.shape[-1]
    # float32: a few ulps per entry; bfloat16: the output's own rounding (2^-8 relative per entry).
    eps = torch.finfo(dtype).eps
    tol = (8 * n * eps if dtype == torch.float32 else 2 * eps) * (k + 1)
    err = (p.double().sum(-1) - k).abs()
    assert (err <= tol).all(), f"|sum p - k| = {err.max().item():.3g} > {tol.max().item():.3g}"
    ref = soft_topk_reference(scores.double(), k, alpha)
    assert (p.double() - ref).abs().max() <= (32 * eps if dtype == torch.float32 else 2 * eps)


@pytest.mark.parametrize("checks", ["auto", "off"])
def test_found_by_fuzzing(checks, monkeypatch):
    """The cases of the issue that made the op exact (sum p != k before)."""
    monkeypatch.setenv("SOFTMOE_CHECKS", checks)
    row = torch.tensor([[2.0, 0.7179, 0.8898, 0.9173, 2.0259, 0.4188, 0.9582, 0.0]])
    p = soft_topk(row, 2.3528, alpha=0.01)
    torch.testing.assert_close(p.sum(), torch.tensor(2.3528), atol=2e-6, rtol=0)
    torch.testing.assert_close(p[0, 6].double(), soft_topk_reference(row.double(), 2.3528, 0.01)[0, 6], atol=1e-6, rtol=0)
    # Six ties between two far scores: the threshold sits 0.6931 above the ties.
    row = torch.tensor([[0.0] + [100.0] * 6 + [200.0]])
    torch.testing.assert_close(soft_topk(row, 2.5).sum(), torch.tensor(2.5), atol=1e-6, rtol=0)
    # A constant offset changes nothing (shift invariance), even where it eats the float32 digits.
    base = torch.tensor([[0.0, 1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 0.25]])
    for offset in (1e3, 1e5, 1e7):
        torch.testing.assert_close(soft_topk(base + offset, 2.0).sum(), torch.tensor(2.0), atol=2e-6, rtol=0)
    torch.testing.assert_close(soft_topk(base + 1e3, 2.0), soft_topk(base, 2.0), atol=1e-4, rtol=0)


def test_k_is_checked_in_its_own_precision():
    row = torch.randn(1, 8)
    k = torch.tensor(8 - 1e-9, dtype=torch.float64)  # rounds to 8.0 in float32: still a valid k
    p = soft_topk(row, k, 1.0)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.double().sum(), k, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="k=8.0 must satisfy"):
        soft_topk(row, torch.tensor(8.0, dtype=torch.float64), 1.0)


@pytest.mark.parametrize(
    "scores, alpha, match",
    [
        (torch.randn(2, 8), 1e-40, r"alpha=1e-40 must be a finite number > 0 and at least"),
        (torch.tensor([[3e38, -3e38, 0.0]]), 1.0, r"overflows torch.float32"),
        (torch.tensor([[100.0, -100.0, 0.0]]), 1e-37, r"overflows torch.float32"),
    ],
)
def test_degenerate_inputs_are_a_clear_error(scores, alpha, match):
    with pytest.raises(ValueError, match=match):
        soft_topk(scores, 1.5, alpha)


def test_degenerate_inputs_without_checks_stay_finite(monkeypatch):
    monkeypatch.setenv("SOFTMOE_CHECKS", "off")
    p = soft_topk(torch.tensor([[3e38, -3e38, 0.0]]), 1.5, 1.0)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(), torch.tensor(1.5), atol=1e-6, rtol=0)


def test_dim_must_be_an_int():
    with pytest.raises(TypeError, match="dim must be an int"):
        soft_topk(torch.randn(2, 4), 1.0, dim="x")


@pytest.mark.parametrize("checks", ["auto", "off"])
def test_fuzz_cases_that_needed_more_closed_form_steps(checks, monkeypatch):
    """Cases 6085 and 7700 of `python -m benchmarks.fuzz_lapsum` (float32, far-apart tie groups): the sync-free
    solver's fixed 3 steps after the closed form left |sum p - k| of 0.04 and 0.01; it now takes 6."""
    from benchmarks.fuzz_lapsum import fuzz_cases

    monkeypatch.setenv("SOFTMOE_CHECKS", checks)
    found = {case: (r, k, alpha) for case, r, k, alpha in fuzz_cases(7701, torch.float32) if case in (6085, 7700)}
    for r, k, alpha in found.values():
        p = soft_topk(r, k, alpha).double()
        assert ((p.sum(-1) - k).abs() <= 8 * r.shape[-1] * torch.finfo(torch.float32).eps * (k + 1)).all()


# ---------------------------------------------------------------- the smallest resolvable k
# The threshold is solved for n - k, which the compute dtype holds to ulp(n) / 2: k below 2^9 n eps would come
# out wrong by more than 2^-10 of itself (issue 27: all zeros for k = 1e-7 of 8, 0.01001 for k = 0.01 of 512).


@PROFILE
@given(st.integers(min_value=2, max_value=1024), st.integers(min_value=0, max_value=2**31 - 1),
       st.floats(min_value=0.0, max_value=1.0), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from(["auto", "off"]))
def test_every_accepted_k_is_met_to_a_2_pow_minus_10_fraction(n, seed, u, dtype, checks):
    import os

    k_min = smallest_k(n, dtype)
    k = k_min * (n / 2 / k_min) ** u  # log-uniform over [smallest k, n / 2]
    scores = torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    os.environ["SOFTMOE_CHECKS"] = checks
    try:
        p = soft_topk(scores, k)
    finally:
        del os.environ["SOFTMOE_CHECKS"]
    err = (p.double().sum(-1) - k).abs()
    assert (err <= k / 1024).all(), f"|sum p - k| = {err.max().item():.3g} for k = {k:.3g}, n = {n}"


@pytest.mark.parametrize("scores, k, named", [
    (torch.zeros(1, 8), 1e-7, "k=1e-07 is below 0.000488"),
    (torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), 0.01, "k=0.01 is below 0.0312"),
    (torch.zeros(2, 8), torch.tensor([1.0, 1e-7]), "k=1e-07 is below 0.000488"),  # per-row k: the bad one named
    (torch.zeros(1, 8, dtype=torch.bfloat16), 1e-4, "k=0.0001 is below 0.000488"),  # half types: float32 solve
])
def test_a_k_below_the_resolvable_one_is_refused_by_name(scores, k, named):
    with pytest.raises(ValueError, match=rf"{named}, the smallest k that torch.float32 resolves among n="):
        soft_topk(scores, k)


def test_float64_resolves_the_small_k_float32_refuses():
    p = soft_topk(torch.zeros(1, 8, dtype=torch.float64), 1e-7)
    torch.testing.assert_close(p, torch.full((1, 8), 1e-7 / 8, dtype=torch.float64), rtol=1e-8, atol=0)
    row = torch.randn(1, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(soft_topk(row, 0.01).sum().item() - 0.01) < 1e-12
