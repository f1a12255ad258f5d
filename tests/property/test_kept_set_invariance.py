"""The paper's rule, worked out: while every p_i < 1/2 the kept set does not depend on k.

LapSum gives p_i = F((r_i - b) / alpha) with F(x) = e^x / 2 for x < 0, so while every p_i < 1/2 raising k only
lowers b and every p_i scales by the same factor, as does the threshold 1.8 k / E. The kept set is then
{i : softmax(r / alpha)_i >= threshold / E}, clamped to between 1 and m = min(ceil(c k), E) experts: k enters
only through the cap. This checks that on our op and truncation over random E, k, alpha and logit scales, and
that the uncapped set is exactly the one that formula predicts (an oracle written from the formula, not from the
implementation). docs/routers.md, "Nominal k and realized count", states it with the table of
benchmarks/realized_count_table.py.

Run: .venv/bin/python -m pytest -q tests/property/test_kept_set_invariance.py
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from softmoe.ops import soft_topk
from softmoe.routing.softk import relative_keep

PROFILE = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THRESHOLD = 1.8


def kept(logits: torch.Tensor, k: float, alpha: float, cap_factor: float) -> torch.Tensor:
    p = soft_topk(logits, k, alpha)
    return relative_keep(p, torch.tensor(k, dtype=p.dtype), THRESHOLD, cap_factor), p


@PROFILE
@given(num_experts=st.sampled_from([4, 8, 16, 32, 64, 128]), seed=st.integers(0, 2**31 - 1),
       spread=st.sampled_from([0.05, 0.25, 0.45, 0.7, 1.0]), alpha=st.sampled_from([0.5, 1.0, 2.0]),
       k_pair=st.tuples(st.floats(1.0, 3.0), st.floats(1.0, 3.0)))
def test_below_one_half_the_kept_set_does_not_depend_on_k(num_experts, seed, spread, alpha, k_pair):
    k1, k2 = (min(k, num_experts - 0.5) for k in k_pair)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, num_experts, generator=gen, dtype=torch.float64) * spread
    keep1, p1 = kept(logits, k1, alpha, cap_factor=float(num_experts))  # cap m = E: it never binds
    keep2, p2 = kept(logits, k2, alpha, cap_factor=float(num_experts))
    rows = (p1.max(-1).values < 0.5) & (p2.max(-1).values < 0.5)
    # the oracle: softmax(r / alpha) >= threshold / E, at least the top expert; away from the boundary
    share = torch.softmax(logits / alpha, dim=-1)
    margin = (share - THRESHOLD / num_experts).abs().min(-1).values > 1e-9
    rows &= margin
    assume(bool(rows.any()))
    predicted = share >= THRESHOLD / num_experts
    predicted |= share == share.max(-1, keepdim=True).values
    assert torch.equal(keep1[rows], keep2[rows])
    assert torch.equal(keep1[rows], predicted[rows])
    # and p scales with k: p2 / p1 = k2 / k1 on every entry of those rows
    torch.testing.assert_close(p2[rows] / p1[rows], torch.full_like(p1[rows], k2 / k1), rtol=1e-9, atol=0)


@PROFILE
@given(num_experts=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**31 - 1),
       k=st.floats(1.0, 3.0), cap_factor=st.sampled_from([1.0, 2.0, 4.0]))
def test_the_cap_keeps_the_largest_of_the_uncapped_set(num_experts, seed, k, cap_factor):
    """k moves the kept set only through the cap m = min(ceil(c k), E): the m largest of the k-free set."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(32, num_experts, generator=gen, dtype=torch.float64) * 0.8
    capped, p = kept(logits, k, 1.0, cap_factor)
    free, _ = kept(logits, k, 1.0, float(num_experts))
    m = min(math.ceil(k * cap_factor), num_experts)
    rows = p.max(-1).values < 0.5
    assume(bool(rows.any()))
    count = free.sum(-1)
    assert torch.equal(capped.sum(-1)[rows], count.clamp(max=m)[rows])
    assert bool((capped <= free)[rows].all())
