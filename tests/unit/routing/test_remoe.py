"""ReMoERouter (Wang et al., ICLR 2025): the layer equals the naive dense oracle (ReLU weights, every
positive gate routed, optional cap); tokens with no positive gate give exactly zero output; the
load-balanced L1 and its lambda; batch, decoding and padding invariance; counts only in training;
ModelConfig accepts router='remoe'; config errors name the field.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_remoe.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.layers import MoELayer
from softmoe.model.config import ModelConfig
from softmoe.routing import ROUTERS, ReMoEConfig, build_router
from softmoe.routing.remoe import relu_l1_loss
from tests.reference import dense_moe as ref

D, H, E = 16, 32, 8

# name -> (k, layer options)
CASES = {
    "k2": (2.0, {}),
    "k2_cap3": (2.0, dict(max_active=3)),
    "k1_cap1": (1.0, dict(max_active=1)),
    "k8": (8.0, dict(lambda_init=0.5)),
}


def make_layer(case: str = "k2", impl: str = "padded", seed: int = 0, scale: float = 2.0) -> MoELayer:
    torch.manual_seed(seed)
    k, options = CASES[case]
    layer = MoELayer(D, H, E, router="remoe", k=k, experts_impl=impl, **options)
    with torch.no_grad():
        layer.router.gate.weight.mul_(scale)
    return layer


@pytest.mark.parametrize("impl", ["padded", "grouped", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_equals_dense_reference(case, impl):
    layer = make_layer(case, impl)
    x = torch.randn(3, 7, D)
    weight_TE = ref.remoe_weights(layer, x.reshape(-1, D))
    routing = layer.router(x.reshape(-1, D)).routing
    torch.testing.assert_close(routing.dense_weights(), weight_TE, rtol=0, atol=1e-6)
    assert torch.equal(routing.dense_weights() > 0, weight_TE > 0)  # the same experts are chosen
    torch.testing.assert_close(layer(x).output, ref.dense_moe(layer, x, weight_TE), rtol=0, atol=1e-5)


def test_variable_count_and_stats():
    layer = make_layer("k2")
    x = torch.randn(200, D)
    out = layer.router(x)
    relu = torch.relu(x @ layer.router.gate.weight.t()).detach()
    active_T = out.routing.active_per_token()
    assert torch.equal(active_T, (relu > 0).sum(-1))
    assert active_T.unique().numel() > 2  # a variable number of experts per token
    assert out.stats["sparsity"] == pytest.approx(1 - float(active_T.float().mean()) / E, abs=1e-6)
    assert out.stats["sparsity"] == pytest.approx(1 - float(out.stats["active_experts_mean"]) / E, abs=1e-6)
    assert out.stats["zero_expert_fraction"] == pytest.approx(float((active_T == 0).float().mean()), abs=1e-6)
    assert out.stats["l1_coef"] == pytest.approx(1e-8)
    # The paper's load-balanced L1: f_e = E / (k T) * #tokens routed to e, times the mean gate of e.
    f = E / (2.0 * 200) * (relu > 0).float().sum(0)
    reg = float((f * relu.mean(0)).sum())
    assert out.stats["l1_reg"] == pytest.approx(reg, rel=1e-5)
    assert float(out.aux_loss.detach()) == pytest.approx(1e-8 * reg, rel=1e-5)  # lb_coef = z_coef = 0


def test_cap_keeps_the_largest_positive_gates():
    layer = make_layer("k2_cap3", scale=4.0)
    out = layer.router(torch.randn(100, D))
    assert int(out.routing.active_per_token().max()) == 3
    assert out.stats["sparsity"] >= 1 - 3 / E


def test_no_positive_gate_gives_exactly_zero_output():
    layer = make_layer("k2")
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, 0] = 1.0  # every gate is x_0: all zero for tokens with x_0 <= 0
    x = torch.randn(2, 5, D)
    x[0, 0, 0], x[1, 3, 0], x[0, 1, 0] = -1.0, -2.0, 1.0
    y, _, stats, _ = layer(x)
    zero_T = layer.router(x.reshape(-1, D)).routing.active_per_token() == 0
    assert bool(zero_T[0]) and bool(zero_T[8]) and not bool(zero_T[1])
    assert torch.equal(y.reshape(-1, D)[zero_T], torch.zeros(int(zero_T.sum()), D))
    assert stats["active_experts_hist"][0] == float(zero_T.sum())
    assert stats["active_experts_hist"][E] == float((~zero_T).sum())  # x_0 > 0: all 8 gates equal, positive


def test_relu_l1_loss_is_the_plain_l1_at_balance():
    weight = torch.rand(6, 4)
    routed = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]] * 3).bool()  # k = 2 per token, every expert 3 tokens
    mask = torch.ones(6)
    # f_e = 4 / (2 * 6) * 3 = 1 for every expert
    torch.testing.assert_close(relu_l1_loss(weight, routed, mask, 2.0), weight.mean(0).sum())
    padded = torch.cat([weight, torch.full((2, 4), 7.0)])
    torch.testing.assert_close(relu_l1_loss(padded, torch.cat([routed, routed[:2]]), torch.cat([mask, torch.zeros(2)]),
                                            2.0), weight.mean(0).sum())


def test_gradients_reach_gate_through_output_and_l1():
    layer = make_layer("k8", scale=1.0)
    y, aux, _, _ = layer(torch.randn(2, 6, D))
    (y.square().sum() + aux).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    layer.zero_grad()
    layer(torch.randn(2, 6, D)).aux_loss.backward()  # the L1 alone pushes the positive gates down
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert layer.router.l1_coef.grad is None and not layer.router.l1_coef.requires_grad


def test_the_counts_are_returned_not_stored():
    """The controller's counts come back as statistics (real tokens only); the router keeps no counter."""
    layer = make_layer("k2")
    router = layer.router
    x = torch.randn(3, 4, D)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    stats = layer(x, attention_mask=mask).stats
    assert float(stats["real_tokens"]) == 8
    assert float(stats["expert_counts"].sum()) == pytest.approx(float(stats["active_experts_mean"]) * 8)
    assert set(router.state_dict()) == {"gate.weight", "l1_coef"}
    assert {name for name, _ in router.named_buffers()} == {"l1_coef"}


def test_registered_with_the_papers_defaults():
    assert ROUTERS["remoe"][0] is ReMoEConfig
    router = build_router("remoe", D, E, 2.0)
    cfg = router.config
    assert router.uses_budget is False and cfg.max_active is None and cfg.lambda_init == 1e-8
    assert cfg.lambda_factor == 1.2 and cfg.lb_coef == 0.0 and cfg.z_coef == 0.0
    assert cfg.target_sparsity == pytest.approx(0.75)


def test_model_config_accepts_remoe():
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, num_experts=4, d_expert=8, router="remoe",
                      k=1.0, router_options=dict(lambda_init=1e-3, max_active=2))
    assert cfg.router == "remoe"
    with pytest.raises(ValueError, match="lambda_init=-1.0"):
        ModelConfig(router="remoe", router_options=dict(lambda_init=-1.0))


@pytest.mark.parametrize("options,error,match", [
    (dict(lambda_init=0.0), ValueError, r"lambda_init=0.0 must be"),
    (dict(lambda_init="tiny"), TypeError, "lambda_init must be a float"),
    (dict(lambda_factor=1.0), ValueError, r"lambda_factor=1.0 must be"),
    (dict(lambda_factor=float("inf")), ValueError, r"lambda_factor=inf"),
    (dict(max_active=0), ValueError, r"max_active=0 must be None or an int in \[1, 8\]"),
    (dict(max_active=9), ValueError, r"max_active=9"),
    (dict(max_active=2.0), TypeError, r"max_active=2.0"),
    (dict(loss_free_bias=True), ValueError, r"unknown option\(s\) \['loss_free_bias'\]"),
])
def test_bad_config_raises_naming_field(options, error, match):
    options = dict(options)
    k = options.pop("k", 2.0)
    with pytest.raises(error, match=match):
        build_router("remoe", D, E, k, **options)
