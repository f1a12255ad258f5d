"""The budget dial: proportional rescaling with clipping, exact mean k at every K', realized active experts
that move with K', the model restored afterwards, the plot, and the errors.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_budget_dial.py
"""

from __future__ import annotations

import math

import pytest
import torch

from softmoe.data import load_split
from softmoe.eval.budget import budget_sweep, check_budgets, dialed, plot_budget_sweep, scaled_allocation
from softmoe.train.restore import load_model


def test_scaling_is_proportional_when_nothing_clips():
    k_L = torch.tensor([1.2, 2.0, 2.8], dtype=torch.float64)
    out = scaled_allocation(k_L, 1.5, 0.5, 3.5)
    torch.testing.assert_close(out, k_L * 1.5 / 2.0)


@pytest.mark.parametrize("budget", [0.6, 1.0, 2.0, 3.0, 3.4, 3.5])
def test_clipped_layers_hand_their_overflow_to_the_others(budget):
    k_L = torch.tensor([1.0, 1.5, 3.4, 2.1], dtype=torch.float64)
    out = scaled_allocation(k_L, budget, 0.5, 3.5)
    assert float(out.mean()) == pytest.approx(budget, abs=1e-12)
    assert float(out.min()) >= 0.5 and float(out.max()) <= 3.5
    free = (out > 0.5 + 1e-9) & (out < 3.5 - 1e-9)
    if int(free.sum()) > 1:  # the unclipped layers keep their learned ratios
        ratios = out[free] / k_L[free]
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))


def test_scaled_allocation_rejects_out_of_range_budget():
    with pytest.raises(ValueError, match="budget=4.0"):
        scaled_allocation(torch.ones(3), 4.0, 0.5, 3.5)


@pytest.fixture
def softmoe_model(softmoe_run):
    model, config, _ = load_model(softmoe_run, report=lambda message: None)
    with torch.no_grad():  # a non-uniform learned allocation, so the scaling is visible
        model.budget.theta.copy_(torch.tensor([0.4, -0.4]))
        # The 40-step tiny model's logits are nearly flat, so under the paper's rule (alpha 1, tau =
        # 1.8 k / E clamped to the largest p) every token keeps one expert at any K'. Sharper gates, as
        # a longer-trained router has, let the realized count follow K'.
        for module in model.modules():
            if hasattr(module, "gate") and isinstance(module.gate, torch.nn.Linear):
                module.gate.weight.mul_(8.0)
    return model, config


def test_sweep_pins_exact_mean_k_and_active_experts_move_with_k(softmoe_model, tiny_data):
    model, config = softmoe_model
    learned = model.budget.k().clone()
    tokens = load_split(tiny_data / "tiny", "val")
    budgets = [1.0, 1.5, 2.0, 3.0]
    points = budget_sweep(model, tokens, config.data.seq_len, budgets, batch_size=8, num_bytes=1000)
    for point, budget in zip(points, budgets):
        assert sum(point.k_L) / len(point.k_L) == pytest.approx(budget, abs=1e-5)
        assert point.bits_per_byte == pytest.approx(point.loss * point.tokens / (1000 * math.log(2)))
    # the learned allocation's shape is kept: layer 0 stays above layer 1 (K' = 1 = k_min pins both to 1)
    assert points[0].k_L == [1.0, 1.0] and all(p.k_L[0] > p.k_L[1] for p in points[1:])
    active = [p.active_experts_mean for p in points]
    assert active == sorted(active) and active[-1] > active[0] + 0.5
    flops = [p.expert_flops_per_token for p in points]
    assert flops == sorted(flops)
    torch.testing.assert_close(model.budget.k(), learned)  # the model's own budget is restored
    assert not bool(model.budget.pinned)


def test_dialed_restores_state_even_on_error(softmoe_model):
    model, _ = softmoe_model
    before = {k: v.clone() for k, v in model.budget.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with dialed(model, 1.5) as k_L:
            assert float(k_L.double().mean()) == pytest.approx(1.5, abs=1e-6)
            raise RuntimeError("boom")
    after = model.budget.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_errors_name_the_budget_and_the_router(softmoe_model, topk_run):
    model, _ = softmoe_model
    with pytest.raises(ValueError, match="budget=7.6 is out of range"):  # E = 8, margin 0.5 -> k_max = 7.5
        check_budgets(model, [1.0, 7.6])
    with pytest.raises(ValueError, match="budget=0.5 is out of range"):  # preset k_min = 1
        check_budgets(model, [0.5])
    with pytest.raises(ValueError, match="budgets=\\[\\]"):
        check_budgets(model, [])
    with pytest.raises(ValueError, match="budget=nan must be a finite number"):
        check_budgets(model, [float("nan")])
    with pytest.raises(TypeError, match="budget must be a float, got str '2'"):
        check_budgets(model, ["2"])
    topk, _, _ = load_model(topk_run, report=lambda message: None)
    with pytest.raises(ValueError, match="router='topk'"):
        check_budgets(topk, [2.0])


def test_plot_writes_a_png(softmoe_model, tiny_data, tmp_path):
    model, config = softmoe_model
    tokens = load_split(tiny_data / "tiny", "val")
    points = budget_sweep(model, tokens, config.data.seq_len, [1.0, 2.0], batch_size=8, max_batches=1)
    assert all(p.bits_per_byte is None for p in points)  # partial split: no byte count
    path = plot_budget_sweep(points, tmp_path / "dial.png", trained_budget=2.0)
    assert path.stat().st_size > 1000
