"""Routing diagnostics (routing/diagnostics.py): logit spread, load statistics, dead experts, the load window.

Oracles are written from the definitions with plain Python / numpy, not from the implementation.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_diagnostics.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softmoe.layers import MoELayer
from softmoe.routing.diagnostics import DEAD_LOAD, RoutingCounts, load_diagnostics, logit_spread


def test_logit_spread_is_the_mean_over_real_tokens_of_the_population_std():
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0], [5.0, -5.0]])
    mask = torch.tensor([1.0, 1.0, 0.0])  # the third token is padding
    assert float(logit_spread(logits, mask)) == pytest.approx((1.0 + 0.0) / 2)
    assert float(logit_spread(logits, torch.zeros(3))) == 0.0  # no real token


@pytest.mark.parametrize("counts", [[10, 10, 10, 10], [40, 0, 0, 0], [25, 12, 2, 1], [7, 0, 3, 30]])
def test_load_diagnostics_match_their_definitions(counts):
    c = np.array(counts, dtype=np.float64)
    got = {key: float(value) for key, value in load_diagnostics(torch.tensor(counts)).items()}
    assert got["load_max_over_mean"] == pytest.approx(c.max() / c.mean())
    assert got["load_cv"] == pytest.approx(c.std() / c.mean())
    share = c / c.sum()
    assert got["dead_fraction"] == pytest.approx(np.mean(share < DEAD_LOAD / len(c)))


def test_load_diagnostics_without_any_pair():
    got = load_diagnostics(torch.zeros(4))
    assert float(got["load_max_over_mean"]) == 0.0 and float(got["load_cv"]) == 0.0
    assert float(got["dead_fraction"]) == 1.0


def counted(counts_E: list[float], tokens: float) -> dict:
    return {"expert_counts": torch.tensor(counts_E), "real_tokens": torch.tensor(tokens)}


def test_routing_counts_sum_forwards_and_round_trip_a_state_dict():
    window = RoutingCounts()
    assert window.active_L().shape == (0,)
    window.add({0: counted([3.0, 1.0, 0.0, 0.0], 2.0), 2: counted([1.0, 1.0, 1.0, 1.0], 2.0)})
    window.add({0: counted([1.0, 1.0, 0.0, 2.0], 2.0), 2: counted([1.0, 1.0, 1.0, 1.0], 2.0)})
    summary = window.summary()
    assert summary[0]["expert_load"].tolist() == [0.5, 0.25, 0.0, 0.25]
    assert float(summary[0]["dead_fraction"]) == 0.25 and float(summary[2]["load_cv"]) == 0.0
    assert window.active_L().tolist() == [2.0, 2.0]  # 8 pairs over 4 real tokens, per layer
    restored = RoutingCounts()
    restored.load_state_dict(window.state_dict())
    assert restored.summary()[0]["expert_load"].tolist() == [0.5, 0.25, 0.0, 0.25]
    assert restored.active_L().tolist() == [2.0, 2.0]
    window.reset()
    assert window.summary() == {}


@pytest.mark.parametrize("router, options", [("softmoe", {}), ("topk", {}), ("topk", {"normalize": False}),
                                             ("remoe", {})])
def test_every_layer_returns_the_diagnostics(router, options):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, num_experts=8, router=router, k=2.0, **options)
    x = torch.randn(2, 12, 16)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    out = layer(x, attention_mask=mask)
    stats = out.stats
    for key in ("logit_spread", "weight_sum_mean", "load_max_over_mean", "load_cv", "dead_fraction"):
        assert isinstance(stats[key], torch.Tensor) and stats[key].dim() == 0, key
    real = out.router_logits.detach()[mask.reshape(-1)]
    assert stats["logit_spread"] == pytest.approx(float(real.std(dim=-1, correction=0).mean()), rel=1e-5)
    assert stats["expert_counts"].sum() == pytest.approx(float(stats["active_experts_mean"]) * int(mask.sum()))
    # the summed combine weight per token: the dense weights of the real tokens, summed and averaged
    dense = out_dense_weights(layer, x, mask)
    assert stats["weight_sum_mean"] == pytest.approx(float(dense.sum() / mask.sum()), rel=1e-5)


def out_dense_weights(layer: MoELayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    routed = layer.router(x.reshape(-1, x.shape[-1]), mask_T=mask.reshape(-1))
    return routed.routing.dense_weights().detach()
