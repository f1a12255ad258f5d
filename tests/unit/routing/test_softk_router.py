"""SoftKRouter semantics of our earlier rule (truncation=min_weight, options given explicitly): alpha -> 0
is Mixtral top-k; peaked scores keep ~ceil(k) experts, flat scores more; kept mass is k; the combine modes'
sums; the budget's k_l reaches the routing. The paper's rule (the default): test_softk_paper_rule.py.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_softk_router.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.routing import build_router

D, E = 16, 8


def routers(seed=0, **options):
    torch.manual_seed(seed)
    options = {"truncation": "min_weight", "combine": "mask_softmax", **options}
    soft = build_router("softmoe", D, E, 2.0, **options)
    top = build_router("topk", D, E, 2.0, normalize=True)
    with torch.no_grad():
        top.gate.weight.copy_(soft.gate.weight)
    return soft, top


def test_hard_limit_equals_mixtral_topk():
    soft, top = routers(alpha=1e-4, min_weight=0.5)
    x = torch.randn(32, D)
    torch.testing.assert_close(soft(x).routing.dense_weights(), top(x).routing.dense_weights(), rtol=0, atol=1e-5)
    assert soft(x).stats["active_experts_mean"] == 2.0


def test_peaked_scores_keep_about_ceil_k_and_flat_scores_keep_more():
    soft, _ = routers(alpha=0.1, min_weight=0.05)
    x = torch.randn(64, D)
    with torch.no_grad():
        soft.gate.weight.mul_(20.0)
    peaked = soft(x).stats["active_experts_mean"]
    with torch.no_grad():
        soft.gate.weight.mul_(0.01 / 20.0)
    flat = soft(x).stats["active_experts_mean"]
    assert 2.0 <= peaked <= 2.5 and flat >= 6.0, (peaked, flat)


@pytest.mark.parametrize("combine", ["mask_softmax", "mask_softmax_raw", "p"])
def test_kept_mass_and_weight_sums(combine):
    soft, _ = routers(min_weight=0.0, combine=combine)
    x = torch.randn(20, D)
    out = soft(x, k=torch.tensor(2.7))
    assert out.stats["kept_mass"] == pytest.approx(2.7, abs=1e-5)
    assert out.stats["k"] == pytest.approx(2.7)
    sums = out.routing.dense_weights().sum(-1)
    if combine == "mask_softmax_raw":
        assert bool((sums < 1).all())
    else:
        torch.testing.assert_close(sums, torch.ones(20), rtol=0, atol=1e-5)


def test_budget_k_changes_the_routing():
    soft, _ = routers(alpha=0.05, min_weight=0.05)
    x = torch.randn(64, D)
    few = soft(x, k=torch.tensor(1.2)).stats["active_experts_mean"]
    many = soft(x, k=torch.tensor(5.0)).stats["active_experts_mean"]
    assert many > few + 2
