"""Shared and fine-grained experts (DeepSeekMoE, Dai et al. 2024) with every registered router: the
layer with s shared experts == the routed layer + one dense SwiGLU of width s * H on every real token
(and both == the naive dense oracle); padding gets nothing; granularity g keeps the expert parameters,
the active FFN parameters and the FLOPs of the coarse layer and still matches the oracle; nominal and
realised counts (ModelConfig.active_ffn_params, eval.flops.compute_cost); bad values raise naming
the argument.

Run: .venv/bin/python -m pytest -q tests/unit/layers/test_shared_fine_experts.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softmoe.eval.flops import compute_cost
from softmoe.eval.perplexity import accumulate_routing
from softmoe.layers import MoELayer
from softmoe.layers.moe import fine_grained
from softmoe.model import GPT, ModelConfig
from softmoe.routing import ROUTERS
from tests.reference import dense_moe as ref
from tests.reference.invariance import assert_padding_ignored

D, H, E, K = 16, 32, 8, 2.0
ROUTER_NAMES = sorted(ROUTERS)  # every registered router, including ones added later

# Routers with an independent per-definition oracle; the others are checked against their own
# routing's dense weights (dispatch, experts, combine and the shared path are still the oracle's).
ORACLES = {
    "topk": ref.topk_weights,
    "topp": ref.topp_weights,
    "null": ref.null_weights,
    "expert_choice": ref.expert_choice_weights,
}


def make_layer(router: str, seed: int = 0, **options) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(D, H, E, router=router, k=K, **options)


def oracle_weights(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    own = layer.router(x_TD).routing.dense_weights()
    if layer.router.name in ORACLES:
        weight_TE = ORACLES[layer.router.name](layer, x_TD)
        torch.testing.assert_close(own, weight_TE, rtol=0, atol=1e-6)
        return weight_TE
    return own


def dense_swiglu(ffn, x: torch.Tensor) -> torch.Tensor:
    """The shared FFN from its weights, written out: W_down (silu(W_gate x) * W_up x)."""
    return (F.silu(x @ ffn.w_gate.weight.t()) * (x @ ffn.w_up.weight.t())) @ ffn.w_down.weight.t()


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_shared_experts_add_a_dense_swiglu_on_every_token(router):
    plain = make_layer(router)
    shared = make_layer(router, num_shared_experts=2)  # same seed: same router and routed experts
    assert torch.equal(plain.router.gate.weight, shared.router.gate.weight)
    assert shared.shared_experts.w_gate.weight.shape == (2 * H, D)  # s experts of width H = one of 2H
    x = torch.randn(3, 7, D)
    y = shared(x).output
    torch.testing.assert_close(y, plain(x).output + dense_swiglu(shared.shared_experts, x), rtol=0, atol=1e-5)
    weight_TE = oracle_weights(shared, x.reshape(-1, D))
    expected = ref.dense_moe(shared, x, weight_TE) + dense_swiglu(shared.shared_experts, x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_shared_experts_equal_separate_experts_summed():
    layer = make_layer("topk", num_shared_experts=3)
    x = torch.randn(2, 4, D)
    ffn = layer.shared_experts
    separate = sum((F.silu(x @ ffn.w_gate.weight[j * H:(j + 1) * H].t()) * (x @ ffn.w_up.weight[j * H:(j + 1) * H].t()))
                   @ ffn.w_down.weight[:, j * H:(j + 1) * H].t() for j in range(3))
    torch.testing.assert_close(layer.shared_experts(x), separate, rtol=0, atol=1e-5)


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_padding_gets_nothing_from_shared_or_routed_experts(router):
    layer = make_layer(router, num_shared_experts=1, granularity=2)
    assert_padding_ignored(layer, D, ("active_experts_mean",))
    # NaN padding reaches no gradient either (padding rows are zeroed before the shared FFN).
    x = torch.cat([torch.randn(2, 4, D), torch.full((2, 2, D), float("nan"))], dim=1)
    mask = torch.cat([torch.ones(2, 4), torch.zeros(2, 2)], dim=1).bool()
    out = layer(x, attention_mask=mask)
    (out.output.square().sum() + out.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.shared_experts.parameters())
    assert layer.shared_experts.w_down.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("granularity", [2, 4])
def test_granularity_splits_experts_and_still_matches_the_oracle(router, granularity):
    coarse, fine = make_layer(router), make_layer(router, granularity=granularity)
    assert fine.experts.w_gate.shape == (E * granularity, D, H // granularity)
    assert fine.router.num_experts == E * granularity
    assert fine.router.config.k == pytest.approx(K * granularity)
    assert sum(p.numel() for p in fine.experts.parameters()) == sum(p.numel() for p in coarse.experts.parameters())
    x = torch.randn(3, 5, D)
    y = fine(x).output
    torch.testing.assert_close(y, ref.dense_moe(fine, x, oracle_weights(fine, x.reshape(-1, D))), rtol=0, atol=1e-5)


def test_topk_granularity_keeps_active_params_and_flops():
    coarse = make_layer("topk")
    fine = make_layer("topk", granularity=4)
    x = torch.randn(2, 6, D)
    coarse_stats, fine_stats = coarse(x).stats, fine(x).stats
    assert coarse_stats["active_experts_mean"] == K and fine_stats["active_experts_mean"] == 4 * K
    per_coarse = sum(p.numel() for p in coarse.experts.parameters()) / E
    per_fine = sum(p.numel() for p in fine.experts.parameters()) / (4 * E)
    assert per_fine * fine_stats["active_experts_mean"] == per_coarse * coarse_stats["active_experts_mean"]


def tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=4, d_expert=8,
                max_seq_len=8, router="topk", k=2.0)
    return ModelConfig(**{**base, **changes})


def realized_cost(config: ModelConfig):
    torch.manual_seed(0)
    model = GPT(config)
    out = model(torch.randint(0, config.vocab_size, (2, 8)))
    layers = {}
    accumulate_routing(layers, out.routing)
    return model, compute_cost(model, [layers[i] for i in sorted(layers)])


@pytest.mark.parametrize("router", ["topk", "softmoe"])
def test_model_with_granularity_has_the_coarse_counts(router):
    coarse, fine = tiny_config(router=router), tiny_config(router=router, granularity=4)
    assert (fine.routed_experts, fine.routed_d_expert, fine.routed_k) == (16, 2, 8.0)
    assert fine.active_ffn_params() == coarse.active_ffn_params() == 2 * 3 * 16 * 8 * 2.0
    coarse_model, coarse_cost = realized_cost(coarse)
    fine_model, fine_cost = realized_cost(fine)
    assert fine_model.num_params() - coarse_model.num_params() == 2 * 16 * (16 - 4)  # only the gates grow
    if router == "topk":  # fixed k: realised == nominal
        assert fine_cost.expert_flops_per_token == pytest.approx(coarse_cost.expert_flops_per_token)
        assert fine_cost.expert_flops_per_token == pytest.approx(2 * fine.active_ffn_params())
    if router == "softmoe":  # the budget runs over routed experts: k_l of 16, mean K * g
        assert fine_model.budget.k().mean().item() == pytest.approx(8.0, abs=1e-4)


def test_shared_experts_counted_in_nominal_and_realized_costs():
    config = tiny_config(num_shared_experts=1, granularity=2)  # routed width 4, k = 4, one shared of width 4
    assert config.active_ffn_params() == 2 * 3 * 16 * 4 * (4 + 1)
    model, cost = realized_cost(config)
    per_expert, shared = 3 * 16 * 4, 3 * 16 * 4
    assert cost.per_layer_expert_flops == pytest.approx([2 * (4 * per_expert + shared)] * 2)
    assert cost.expert_flops_per_token == pytest.approx(2 * config.active_ffn_params())
    assert cost.active_params == pytest.approx(model.num_params() - 2 * (8 - 4) * per_expert)


def test_nominal_counts_of_variable_k_routers():
    unit = 2 * 3 * 16 * 8  # two MoE blocks x one expert's parameters
    # null experts: k * E / (E + num_null) real experts at uniform slot load, not k
    null = tiny_config(router="null", k=4.0, router_options={"num_null": 4})
    assert null.nominal_active_experts() == pytest.approx(2.0)
    assert null.active_ffn_params() == pytest.approx(2.0 * unit)
    # expert choice: capacity_factor * k; top-p: the nominal k (selection is by p, realised count data dependent)
    ec = tiny_config(router="expert_choice", k=1.0, router_options={"capacity_factor": 1.5})
    assert ec.active_ffn_params() == pytest.approx(1.5 * unit)
    assert tiny_config(router="topp", k=2.0).active_ffn_params() == pytest.approx(2.0 * unit)
    # the realised cost of a null model counts the real experts actually routed, not k
    model, cost = realized_cost(null)
    assert cost.expert_flops_per_token < 2 * 3 * 16 * 8 * 4.0 * 2


def test_fine_grained_is_the_one_scaling():
    assert fine_grained(8, 256, 2.0, 1) == (8, 256, 2.0)
    assert fine_grained(8, 256, 2.0, 4) == (32, 64, 8.0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_shared_experts=-1), ValueError, r"num_shared_experts=-1 must be an int >= 0"),
    (dict(num_shared_experts=1.0), TypeError, r"num_shared_experts=1.0"),
    (dict(granularity=0), ValueError, r"granularity=0 must be an int >= 1"),
    (dict(granularity=True), TypeError, r"granularity=True"),
    (dict(granularity=3), ValueError, r"d_expert=32 .*must be divisible by granularity=3"),
])
def test_bad_layer_values_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        MoELayer(D, H, E, router="topk", k=K, **kwargs)


@pytest.mark.parametrize("changes,error,match", [
    (dict(num_shared_experts=-1), ValueError, r"num_shared_experts=-1"),
    (dict(num_shared_experts="2"), TypeError, r"num_shared_experts"),
    (dict(granularity=0), ValueError, r"granularity=0"),
    (dict(granularity=3), ValueError, r"d_expert=8 .*must be divisible by granularity=3"),
])
def test_bad_config_values_raise_naming_the_field(changes, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**changes)
