"""The router registry: a new router is one config dataclass and one decorated module, and the
MoE layer runs it through the same dispatch path.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_router_registry.py
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from softmoe.layers import MoELayer
from softmoe.routing import ROUTERS, RouterConfig, build_router, register_router
from softmoe.routing.base import finish_routing, real_tokens, router_logits
from softmoe.routing.record import routing_from_mask


@pytest.fixture
def first_expert_router():
    @dataclass(frozen=True)
    class FirstConfig(RouterConfig):
        scale: float = 1.0

    @register_router("first_expert", FirstConfig)
    class FirstExpertRouter(nn.Module):
        uses_budget = False

        def __init__(self, d_model, config):
            super().__init__()
            self.config, self.num_experts = config, config.num_experts
            self.gate = nn.Linear(d_model, config.num_experts, bias=False)

        def forward(self, x_TD, mean_k=None, mask_T=None):
            real_T = real_tokens(mask_T, x_TD.shape[0], x_TD.device)
            logits_TE = router_logits(x_TD, self.gate.weight, real_T)
            keep_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
            keep_TE[:, 0] = True
            weight_TE = torch.full_like(logits_TE, self.config.scale)
            routing = routing_from_mask(weight_TE, keep_TE & real_T.unsqueeze(-1))
            return finish_routing(routing, logits_TE, real_T, self.config, torch.tensor(1.0))

    yield
    del ROUTERS["first_expert"]


def test_a_new_router_plugs_into_the_layer(first_expert_router):
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="first_expert", k=1.0, scale=2.0)
    x = torch.randn(2, 3, 8)
    bank = layer.experts
    expected = 2.0 * ((torch.nn.functional.silu(x @ bank.w_gate[0]) * (x @ bank.w_up[0])) @ bank.w_down[0])
    out = layer(x)
    torch.testing.assert_close(out.output, expected, rtol=0, atol=1e-6)
    assert out.stats.expert_load.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_registry_errors():
    assert {"topk", "softmoe"} <= set(ROUTERS)
    with pytest.raises(ValueError, match="already registered"):
        register_router("topk", RouterConfig)(nn.Module)
    with pytest.raises(ValueError, match="d_model=0"):
        build_router("topk", 0, 4, 1.0)
    with pytest.raises(ValueError, match="num_experts=0"):
        build_router("topk", 8, 0, 1.0)


def test_router_options_written_as_yaml_1_1_exponent_strings_are_read_as_floats():
    from softmoe.routing import router_config

    assert router_config("remoe", 8, 2.0, lambda_init="1e-3").lambda_init == 1e-3  # YAML 1.1 reads 1e-3 as str
    assert router_config("topk", 8, 2, loss_free_bias=True, bias_update_rate="1e-3").bias_update_rate == 1e-3
    with pytest.raises(TypeError, match="alpha must be a float, got str"):
        router_config("softmoe", 8, 2.0, alpha="soft")
    with pytest.raises(TypeError, match="alpha must be a float, got str"):
        router_config("softmoe", 8, 2.0, alpha="1")  # only the exponent form YAML misreads is converted
