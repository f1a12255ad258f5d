"""Top-k's (and the null router's) combine weights: Mixtral's renormalisation for k > 1, Switch's raw softmax
for k = 1 by default.

A renormalised single weight is always exactly 1, so a top-1 router with Mixtral's normalisation gets no
gradient from the loss through its weights (it learned only from the auxiliary losses: the paper8 study's
first top-1 run reached val loss 5.169 vs top-2's 4.745-4.767). The default must not build that router.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_topk_router.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.routing import build_router, router_config

D, E = 16, 8


@pytest.mark.parametrize("router", ["topk", "null"])
@pytest.mark.parametrize("k, expected", [(1, False), (2, True), (4, True)])
def test_the_default_normalises_only_above_one_expert(router, k, expected):
    assert router_config(router, E, k).normalize is expected
    assert router_config(router, E, k, normalize=not expected).normalize is (not expected)  # explicit wins


def _gate_grad_from_weights(router) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(32, D)
    out = router(x)
    out.routing.weight_N.sum().backward()  # the loss reaches the gate only through the combine weights
    return router.gate.weight.grad


@pytest.mark.parametrize("router", ["topk", "null"])
def test_a_default_top1_gate_learns_from_the_loss(router):
    torch.manual_seed(0)
    grad = _gate_grad_from_weights(build_router(router, D, E, 1, lb_coef=0.0, z_coef=0.0))
    assert grad is not None and grad.abs().sum() > 0


def test_an_explicitly_normalised_top1_gate_gets_no_gradient_from_its_weights():
    torch.manual_seed(0)
    router = build_router("topk", D, E, 1, normalize=True)
    torch.manual_seed(0)
    x = torch.randn(32, D)
    out = router(x)
    assert torch.equal(out.routing.weight_N, torch.ones_like(out.routing.weight_N))
    out.routing.weight_N.sum().backward()
    assert router.gate.weight.grad is None or router.gate.weight.grad.abs().sum() == 0
