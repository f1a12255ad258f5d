"""The router registry: a new router is one config dataclass and one decorated template subclass that
implements only its rule; it runs through the layer's one dispatch path and passes the whole conformance
suite (tests/unit/routing/conformance.py) without a line of its own.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_router_registry.py
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from softmoe.layers import MoELayer
from softmoe.routing import ROUTERS, GateRouter, RouterConfig, Rule, build_router, register_router
from tests.unit.routing.conformance import CHECKS, Case


@pytest.fixture
def first_expert_router():
    """A toy router in a few lines: every token to expert 0 and to its best-scored other expert."""

    @dataclass(frozen=True)
    class FirstConfig(RouterConfig):
        scale: float = 1.0

    @register_router("first_expert", FirstConfig)
    class FirstExpertRouter(GateRouter):
        label = "first expert"

        def rule(self, logits_TE, real_T, k):
            keep_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
            keep_TE[:, 0] = True
            keep_TE.scatter_(-1, logits_TE[:, 1:].argmax(-1, keepdim=True) + 1, True)
            weight_TE = self.config.scale * torch.sigmoid(logits_TE)
            return Rule(self.to_routing(weight_TE, keep_TE & real_T.unsqueeze(-1)))

    yield
    del ROUTERS["first_expert"]


def test_a_new_router_plugs_into_the_layer(first_expert_router):
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="first_expert", k=2.0, scale=2.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[3] = 1.0  # expert 3 scores highest among 1..3 for tokens with sum(x) > 0
    x = torch.randn(2, 3, 8).abs()
    bank = layer.experts
    expected = sum(torch.sigmoid(x @ layer.router.gate.weight[e]).unsqueeze(-1) * 2.0
                   * ((torch.nn.functional.silu(x @ bank.w_gate[e]) * (x @ bank.w_up[e])) @ bank.w_down[e])
                   for e in (0, 3))
    out = layer(x)
    torch.testing.assert_close(out.output, expected, rtol=0, atol=1e-6)
    assert out.stats["expert_load"].tolist() == [0.5, 0.0, 0.0, 0.5]


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_a_new_router_passes_the_conformance_suite_by_registering(first_expert_router, check):
    check(Case("first_expert", 2.0, dict(scale=0.5)))


def test_registry_errors():
    assert {"topk", "softmoe"} <= set(ROUTERS)
    with pytest.raises(ValueError, match="already registered"):
        register_router("topk", RouterConfig)(nn.Module)
    with pytest.raises(ValueError, match="d_model=0"):
        build_router("topk", 0, 4, 1.0)
    with pytest.raises(ValueError, match="num_experts=0"):
        build_router("topk", 8, 0, 1.0)
    with pytest.raises(ValueError, match="registered routers"):
        build_router("nope", 8, 4, 1.0)


def test_the_router_core_never_reads_yaml_strings():
    """YAML 1.1's exponent strings ('1e-3') are read at the config edge (train/config.py, tested in
    tests/unit/train/test_train_config.py); a router's config refuses any string where a number belongs."""
    from softmoe.routing import router_config

    for value in ("1e-3", "1", "soft"):
        with pytest.raises(TypeError, match="lambda_init must be a float, got str"):
            router_config("remoe", 8, 2.0, lambda_init=value)
    assert router_config("remoe", 8, 2.0, lambda_init=1e-3).lambda_init == 1e-3


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_has_typed_options_derived_from_its_config(name):
    """`router_cls.options_class`: the config's fields less num_experts and k, same defaults; frozen, hashable,
    picklable (derived at registration, so pickled by router name); `config(E, k)` builds the checked config."""
    import copy
    import pickle
    from dataclasses import FrozenInstanceError, fields

    from softmoe.routing import RouterOptions, router_class, router_options

    config_cls, router_cls = ROUTERS[name]
    options = router_options(name)
    assert isinstance(options, RouterOptions) and type(options) is router_cls.options_class
    want = {f.name: f.default for f in fields(config_cls) if f.name not in ("num_experts", "k")}
    assert options.values() == want and options.changed() == {}
    assert pickle.loads(pickle.dumps(options)) == options == copy.deepcopy(options) and hash(options) is not None
    with pytest.raises(FrozenInstanceError):
        options.gate_noise = 1.0
    k = 1.0 if router_class(name).uses_budget else 2.0
    assert options.config(8, k) == config_cls(num_experts=8, k=k)
    noisy = router_options(name, gate_noise=0.5)
    assert noisy.changed() == {"gate_noise": 0.5} and noisy.config(8, k).gate_noise == 0.5
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['nope'\] for router='{name}' \(nope=3\)"):
        router_options(name, nope=3)
