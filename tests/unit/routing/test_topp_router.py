"""TopPRouter (Huang et al. 2024): the layer equals the naive dense oracle; the kept set is the
smallest that reaches p and respects max_active; the entropy (dynamic) loss is in aux_loss and lowers the
entropy; its config errors. The shared contract: test_router_conformance.py.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_topp_router.py
"""

from __future__ import annotations

import math

import pytest
import torch

from softmoe.layers import MoELayer
from softmoe.routing import ROUTERS, TopPConfig, build_router
from softmoe.routing.topp import top_p_mask
from tests.reference import dense_moe as ref

D, H, E = 16, 32, 8

# name -> layer options (k is the nominal budget; it never changes the routing)
CASES = {
    "paper_p0.4": dict(p=0.4),
    "p0.7_normalize": dict(p=0.7, normalize=True),
    "p0.9_cap3": dict(p=0.9, max_active=3),
    "p1_all": dict(p=1.0),
    "p1_cap1": dict(p=1.0, max_active=1),
}


def make_layer(case: str, impl: str = "padded", seed: int = 0, scale: float = 4.0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, H, E, router="topp", k=2.0, experts_impl=impl, **CASES[case])
    with torch.no_grad():
        layer.router.gate.weight.mul_(scale)  # spread the router probabilities: 1 to many experts
    return layer


@pytest.mark.parametrize("impl", ["padded", "grouped", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_equals_dense_reference(case, impl):
    layer = make_layer(case, impl)
    x = torch.randn(3, 7, D)
    weight_TE = ref.topp_weights(layer, x.reshape(-1, D))
    routed = layer.router(x.reshape(-1, D)).routing
    torch.testing.assert_close(routed.dense_weights(), weight_TE, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x).output, ref.dense_moe(layer, x, weight_TE), rtol=0, atol=1e-5)


def test_kept_set_is_minimal_reaches_p_and_varies_per_token():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(500, E) * 2.0, dim=-1)
    for p in (0.1, 0.4, 0.75, 0.95):
        keep = top_p_mask(probs, p)
        counts = keep.sum(-1)
        mass = (probs * keep).sum(-1)
        assert bool((mass >= p - 1e-6).all()), p
        # Minimal: dropping the smallest kept expert falls below p; and the kept experts are the most
        # probable ones (every kept probability >= every dropped one).
        smallest_kept = torch.where(keep, probs, math.inf).min(-1).values
        assert bool((mass - smallest_kept < p).all()), p
        largest_dropped = torch.where(keep, -math.inf, probs).max(-1).values
        assert bool((smallest_kept >= largest_dropped).all()), p
        assert int(counts.min()) >= 1
    assert top_p_mask(probs, 0.75).sum(-1).unique().numel() > 1  # a variable number of experts


def test_cap_is_respected_and_keeps_the_most_probable():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(300, E) * 0.3, dim=-1)  # flat: uncapped p=0.95 needs many
    assert int(top_p_mask(probs, 0.95).sum(-1).min()) > 3
    capped = top_p_mask(probs, 0.95, max_active=3)
    assert bool((capped.sum(-1) == 3).all())
    torch.testing.assert_close(capped, top_p_mask(probs, 1.0, max_active=3))
    top3 = torch.zeros_like(capped).scatter(-1, probs.topk(3, dim=-1).indices, True)
    assert torch.equal(capped, top3)


def test_peaked_scores_use_one_expert_and_flat_scores_many():
    router = build_router("topp", D, E, 2.0, p=0.5)
    x = torch.randn(64, D)
    with torch.no_grad():
        router.gate.weight.mul_(100.0)
    assert router(x).stats["active_experts_mean"] == pytest.approx(1.0, abs=0.1)
    with torch.no_grad():
        router.gate.weight.mul_(1e-6)
    assert router(x).stats["active_experts_mean"] == E // 2  # uniform: exactly half the mass at E/2


def test_aux_loss_adds_the_entropy_loss_and_stats():
    torch.manual_seed(0)
    x = torch.randn(40, D)
    router = build_router("topp", D, E, 2.0, p=0.6, entropy_coef=0.5)
    out = router(x)
    with torch.no_grad():
        probs = torch.softmax(x @ router.gate.weight.t(), dim=-1)
        entropy = -(probs * probs.log()).sum(-1).mean()
    assert out.stats["entropy"] == pytest.approx(float(entropy), abs=1e-5)
    expected = 0.01 * float(out.stats["load_balance_loss"]) + 1e-3 * float(out.stats["z_loss"]) + 0.5 * float(entropy)
    assert float(out.aux_loss.detach()) == pytest.approx(expected, abs=1e-5)
    assert out.stats["k"] == 2.0  # nominal budget only
    assert out.stats["kept_mass"] >= 0.6 - 1e-6
    kept_sums = out.routing.dense_weights().sum(-1)
    torch.testing.assert_close(kept_sums.mean(), out.stats["kept_mass"], rtol=0, atol=1e-6)


def test_the_entropy_loss_alone_lowers_the_router_entropy():
    x = torch.randn(2, 6, D)
    router = build_router("topp", D, E, 2.0, lb_coef=0.0, z_coef=0.0, entropy_coef=1.0)
    before = router(x.reshape(-1, D))
    before.aux_loss.backward()
    with torch.no_grad():
        router.gate.weight.sub_(0.5 * router.gate.weight.grad)
    assert router(x.reshape(-1, D)).stats["entropy"] < before.stats["entropy"]


def test_registered_with_the_papers_defaults():
    assert ROUTERS["topp"][0] is TopPConfig
    router = build_router("topp", D, E, 2.0)
    assert router.uses_budget is False and router.config.p == 0.4 and router.config.normalize is False


@pytest.mark.parametrize("options,error,match", [
    (dict(p=0.0), ValueError, r"p=0.0 must be a finite number in \(0.0, 1.0\]"),
    (dict(p=1.5), ValueError, "p=1.5"),
    (dict(p=float("nan")), ValueError, "p=nan"),
    (dict(p="0.5"), TypeError, "p must be a float"),
    (dict(max_active=0), ValueError, "max_active=0"),
    (dict(max_active=9), ValueError, r"max_active=9 must be None or an int in \[1, 8\]"),
    (dict(max_active=2.0), TypeError, "max_active=2.0"),
    (dict(entropy_coef=-1.0), ValueError, "entropy_coef=-1.0"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
])
def test_bad_config_raises_naming_field(options, error, match):
    options = dict(options)
    k = options.pop("k", 2.0)
    with pytest.raises(error, match=match):
        build_router("topp", D, E, k, **options)
