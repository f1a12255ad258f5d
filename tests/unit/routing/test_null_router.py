"""NullRouter (AdaMoE, Zeng et al. 2024): the layer equals the naive dense oracle; null picks reduce
the real experts and all-null tokens give exactly zero output; the null-aware balance loss; gradients
reach the null rows of the gate; its config errors. The shared contract: test_router_conformance.py.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_null_router.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.layers import MoELayer
from softmoe.routing import ROUTERS, NullConfig, build_router
from softmoe.routing.null import null_balance_loss
from tests.reference import dense_moe as ref

D, H, E = 16, 32, 8

# name -> (k, layer options)
CASES = {
    "k4_null8": (4, dict(num_null=8)),
    "k2_null1": (2, dict(num_null=1)),
    "k3_null4_raw": (3, dict(num_null=4, normalize=False)),
    "k1_null2": (1, dict(num_null=2)),
}


def make_layer(case: str, impl: str = "padded", seed: int = 0, scale: float = 3.0) -> MoELayer:
    torch.manual_seed(seed)
    k, options = CASES[case]
    layer = MoELayer(D, H, E, router="null", k=float(k), experts_impl=impl, **options)
    with torch.no_grad():
        layer.router.gate.weight.mul_(scale)  # spread the probabilities: 0 to k real experts per token
    return layer


@pytest.mark.parametrize("impl", ["padded", "grouped", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_equals_dense_reference(case, impl):
    layer = make_layer(case, impl)
    x = torch.randn(3, 7, D)
    weight_TE = ref.null_weights(layer, x.reshape(-1, D))
    routed = layer.router(x.reshape(-1, D)).routing
    torch.testing.assert_close(routed.dense_weights(), weight_TE, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x).output, ref.dense_moe(layer, x, weight_TE), rtol=0, atol=1e-5)


def test_null_picks_reduce_real_experts_and_stats_count_real_only():
    layer = make_layer("k4_null8")
    x = torch.randn(200, D)
    out = layer.router(x)
    active_T = out.routing.active_per_token()
    probs = torch.softmax(out.logits_TE, dim=-1)
    assert out.logits_TE.shape == (200, E + 8)
    null_picks_T = (probs.topk(4, dim=-1).indices >= E).sum(-1)
    assert torch.equal(active_T, 4 - null_picks_T)  # each null pick removes one real expert
    assert active_T.unique().numel() > 1  # a variable number of real experts
    assert int(out.routing.expert_N.max()) < E  # null experts are never dispatched
    assert out.stats["active_experts_mean"] == pytest.approx(float(active_T.float().mean()), abs=1e-6)
    assert out.stats["null_fraction"] == pytest.approx(float(null_picks_T.float().mean()) / 4, abs=1e-6)
    assert out.stats["active_experts_mean"] == pytest.approx(4 * (1 - float(out.stats["null_fraction"])), abs=1e-5)
    assert out.routing.num_experts == E and out.stats["expert_load"].shape == (E,)


def test_all_null_tokens_give_exactly_zero_output():
    layer = make_layer("k1_null2")
    with torch.no_grad():
        # Real experts share a component along feature 0 and the null rows score 0, so a token with
        # a very negative feature 0 picks a null expert (k=1): no real expert at all.
        layer.router.gate.weight[E:] = 0.0
        layer.router.gate.weight[:E, 0] = 5.0
    x = torch.randn(2, 5, D)
    x[0, 0, 0], x[1, 3, 0] = -20.0, -20.0  # real logits ~ -100 < 0 = null logits: all picks null
    y, _, stats, _ = layer(x)
    out = layer.router(x.reshape(-1, D))
    zero_T = out.routing.active_per_token() == 0
    assert bool(zero_T[0]) and bool(zero_T[8]) and not bool(zero_T.all())
    assert torch.equal(y.reshape(-1, D)[zero_T], torch.zeros(int(zero_T.sum()), D))
    assert stats["zero_expert_fraction"] == pytest.approx(float(zero_T.float().mean()), abs=1e-6)
    assert stats["active_experts_hist"][0] == float(zero_T.sum())
    torch.testing.assert_close(y, ref.dense_moe(layer, x, ref.null_weights(layer, x.reshape(-1, D))),
                               rtol=0, atol=1e-5)


def test_normalize_sums_to_one_over_kept_real_experts():
    layer = make_layer("k4_null8")
    out = layer.router(torch.randn(100, D))
    sums = out.routing.dense_weights().sum(-1)
    used = out.routing.active_per_token() > 0
    torch.testing.assert_close(sums[used], torch.ones(int(used.sum())), rtol=0, atol=1e-6)
    assert torch.equal(sums[~used], torch.zeros(int((~used).sum())))


def test_null_balance_loss_groups_null_experts():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(50, E + 4), dim=-1)
    mask = torch.ones(50)
    # Nulls are interchangeable: moving picks between null slots does not change the loss ...
    picks_a = torch.tensor([5] * E + [40, 0, 0, 0])
    picks_b = torch.tensor([5] * E + [10, 10, 10, 10])
    torch.testing.assert_close(null_balance_loss(picks_a, probs, mask, 4),
                               null_balance_loss(picks_b, probs, mask, 4))
    # ... balanced loads and probabilities give 1 ...
    uniform = torch.full((50, E + 4), 1.0 / (E + 4))
    assert float(null_balance_loss(torch.full((E + 4,), 7), uniform, mask, 4)) == pytest.approx(1.0, abs=1e-6)
    # ... and the layer's aux_loss is lb_coef * this + z_coef * z over all slots.
    router = build_router("null", D, E, 4.0, num_null=4, lb_coef=0.5, z_coef=0.1)
    x = torch.randn(30, D)
    out = router(x)
    with torch.no_grad():
        logits = x @ router.gate.weight.t()
        p = torch.softmax(logits, -1)
        picks = torch.zeros_like(p).scatter(-1, p.topk(4, -1).indices, 1.0).sum(0).long()
        lb = null_balance_loss(picks, p, torch.ones(30), 4)
        z = torch.logsumexp(logits, -1).square().mean()
    assert out.stats["load_balance_loss"] == pytest.approx(float(lb), abs=1e-5)
    assert out.stats["z_loss"] == pytest.approx(float(z), rel=1e-5)
    assert float(out.aux_loss.detach()) == pytest.approx(0.5 * float(lb) + 0.1 * float(z), rel=1e-5)


def test_gradients_reach_the_gate_including_null_rows():
    layer = make_layer("k4_null8", scale=1.0)
    x = torch.randn(2, 6, D)
    y, aux, _, _ = layer(x)
    (y.square().sum() + aux).backward()
    grad = layer.router.gate.weight.grad
    assert grad[:E].abs().sum() > 0 and grad[E:].abs().sum() > 0  # null rows learn via softmax + losses
    assert all(p.grad.abs().sum() > 0 for p in layer.experts.parameters())


def test_registered_defaults_and_one_gate_over_all_slots():
    assert ROUTERS["null"][0] is NullConfig
    router = build_router("null", D, E, 2.0)
    assert router.uses_budget is False and router.config.num_null == 1 and router.config.normalize is True
    assert router.gate.weight.shape == (E + 1, D)


@pytest.mark.parametrize("options,error,match", [
    (dict(num_null=0), ValueError, r"num_null=0 must be an int >= 1"),
    (dict(num_null=2.0), TypeError, r"num_null=2.0"),
    (dict(num_null=True), TypeError, r"num_null=True"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(k=1.5), ValueError, r"k=1.5 must be an integer"),
])
def test_bad_config_raises_naming_field(options, error, match):
    options = dict(options)
    k = options.pop("k", 2.0)
    with pytest.raises(error, match=match):
        build_router("null", D, E, k, **options)
