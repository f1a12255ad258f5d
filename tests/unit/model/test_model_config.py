"""ModelConfig validation: every bad field raises naming itself; derived layout is right.

Run: .venv/bin/python -m pytest -q tests/unit/model/test_model_config.py
"""

from __future__ import annotations

import dataclasses

import pytest

from softmoe.model import ModelConfig


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(d_model=30, n_heads=4), ValueError, "d_model=30"),
        (dict(d_model=24, n_heads=8), ValueError, "head_dim"),  # 24 / 8 = 3 is odd: RoPE needs pairs
        (dict(n_layers=0), ValueError, "n_layers=0"),
        (dict(vocab_size=2.5), TypeError, "vocab_size"),
        (dict(ffn="sparse"), ValueError, "ffn='sparse'"),
        (dict(router="hash"), ValueError, "router='hash'"),
        (dict(moe_every=5, n_layers=4), ValueError, "moe_every=5"),
        (dict(router="topk", k=1.5), ValueError, "k=1.5"),
        (dict(router="topk", k=9.0, num_experts=8), ValueError, "k=9.0"),
        (dict(router="softmoe", k=8.0, num_experts=8), ValueError, "k=8.0"),
        (dict(rope_theta=-1.0), ValueError, "rope_theta"),
        (dict(router_options=[1]), TypeError, "router_options"),
    ],
)
def test_invalid_fields_raise_naming_the_field(overrides, error, match):
    with pytest.raises(error, match=match):
        ModelConfig(**overrides)


def test_describe_routing_says_whether_the_budget_learns_the_layers_k():
    assert ModelConfig(router="softmoe", k=1.5, num_experts=16).describe_routing() == \
        "soft mass K=1.5 of 16, learned k_l"
    fixed = ModelConfig(router="softmoe", k=1.5, num_experts=16, budget_options={"learnable": False})
    assert fixed.describe_routing() == "fixed soft mass k=1.5 of 16"
    assert ModelConfig(router="topk", k=2, num_experts=8).describe_routing() == "k=2 of 8"
    # a router without a budget ignores budget_options
    assert ModelConfig(router="topk", k=2, num_experts=8, budget_options={"learnable": False}).describe_routing() \
        == "k=2 of 8"


def test_dense_config_ignores_moe_fields():
    ModelConfig(ffn="dense", router="topk", k=1.5)  # MoE fields are not checked for a dense model


def test_moe_layout_and_active_params():
    c = ModelConfig(n_layers=4, moe_every=2, d_model=64, d_ff=256, d_expert=64, k=2.0)
    assert c.moe_layers == [1, 3]
    dense = ModelConfig(n_layers=4, ffn="dense", d_model=64, d_ff=128)
    moe = ModelConfig(n_layers=4, ffn="moe", d_model=64, d_expert=64, k=2.0)
    assert dense.active_ffn_params() == moe.active_ffn_params()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().d_model = 3


def test_the_options_are_typed_and_built_once_at_construction():
    from softmoe.routing import router_options
    from softmoe.routing.budget import BudgetOptions

    config = ModelConfig(router="softmoe", router_options={"alpha": 0.5}, budget_options={"realized": True})
    assert type(config.router_options).__name__ == "SoftKOptions" and config.router_options.alpha == 0.5
    assert config.budget_options == BudgetOptions(realized=True)
    # a dict and the typed options build the same config; unchanged options read as their defaults
    assert config == ModelConfig(router="softmoe", router_options=router_options("softmoe", alpha=0.5),
                                 budget_options=BudgetOptions(realized=True))
    assert ModelConfig(router_options={}) == ModelConfig(router_options={"alpha": 1.0})
    assert config.routed_router_config().alpha == 0.5
    # another router's options carry what they changed (as a dict of them would): a replace() that changes router
    topk = dataclasses.replace(ModelConfig(router="softmoe", router_options={"gate_noise": 0.1}), router="topk")
    assert type(topk.router_options).__name__ == "TopKOptions" and topk.router_options.changed() == {"gate_noise": 0.1}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpha'\] for router='topk'"):
        ModelConfig(router="topk", router_options=config.router_options)
    with pytest.raises(TypeError, match="router_options must be a dict or TopKOptions for router='topk', got list"):
        ModelConfig(router="topk", router_options=[])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['mood'\] for model\.budget_options \(mood='x'\)"):
        ModelConfig(budget_options={"mood": "x"})
    with pytest.raises(ValueError, match=r"mode='fast'"):
        ModelConfig(budget_options={"mode": "fast"})
