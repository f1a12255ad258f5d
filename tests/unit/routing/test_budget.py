"""Budget: exact mean k_l == K and bounds for any theta and after optimizer steps, penalty mode,
freeze, the budget dial, errors; and a toy task where the allocation moves to the layer that needs it.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_budget.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.layers import MoELayer
from softmoe.routing import Budget
from softmoe.routing.budget import exact_allocation
from tests.reference.dense_moe import expert_outputs




def check_exact(k_L: torch.Tensor, budget: Budget) -> None:
    k_L = k_L.detach()
    assert float(k_L.double().mean()) == pytest.approx(float(budget.budget), abs=1e-6)
    assert float(k_L.min()) >= budget.k_min - 1e-6 and float(k_L.max()) <= budget.k_max + 1e-6


def test_uniform_at_init_for_both_modes():
    for mode in ("exact", "penalty"):
        budget = Budget(4, 8, 2.5, mode=mode)
        torch.testing.assert_close(budget.k(), torch.full((4,), 2.5))
        assert float(budget.penalty().detach()) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_exact_for_any_theta_including_overflow(seed):
    torch.manual_seed(seed)
    budget = Budget(6, 4, 2.5, k_min=1.0, margin=0.5)
    with torch.no_grad():
        budget.theta.copy_(torch.randn(6) * 4)  # large spread: several layers hit the cap k_max = 3.5
    check_exact(budget.k(), budget)


def test_overflow_is_redistributed_in_proportion():
    k_L = exact_allocation(torch.tensor([0.97, 0.02, 0.01], dtype=torch.float64), 2.0, 1.0, 3.0)
    assert float(k_L[0]) == pytest.approx(3.0)  # capped
    assert float(k_L.mean()) == pytest.approx(2.0)
    assert float(k_L[1] - 1.0) == pytest.approx(2 * float(k_L[2] - 1.0))  # rest split 2:1 as the shares


def test_exact_after_optimizer_steps():
    torch.manual_seed(0)
    budget = Budget(4, 4, 3.0)  # k_max = 3.5 binds: layer 0 alone would take 1 + 4 * 2 = 9
    opt = torch.optim.Adam(budget.parameters(), lr=0.5)
    weights = torch.tensor([5.0, -1.0, 0.5, -3.0])  # a loss that wants layer 0 far above the budget
    for _ in range(50):
        loss = -(weights * budget.k()).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        check_exact(budget.k(), budget)
    k_L = budget.k().detach()
    assert float(k_L[0]) == pytest.approx(budget.k_max, abs=1e-4)
    assert float(k_L[3]) < float(k_L[1])


def test_penalty_mode_is_free_but_penalised():
    budget = Budget(2, 8, 2.0, mode="penalty", penalty_coef=3.0)
    with torch.no_grad():
        budget.theta.add_(torch.tensor([1.0, 0.0]))
    k_L = budget.k().detach()
    assert float(k_L.mean()) > 2.0 and float(k_L.max()) <= budget.k_max
    expected = 3.0 * (float(k_L.mean()) - 2.0) ** 2
    assert float(budget.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    budget.penalty().backward()
    assert budget.theta.grad.abs().sum() > 0


def test_freeze_and_budget_dial():
    budget = Budget(3, 8, 2.0)
    with torch.no_grad():
        budget.theta.copy_(torch.tensor([1.0, 0.0, -1.0]))
    shares = budget.k() - budget.k_min
    budget.freeze()
    assert not budget.theta.requires_grad and not budget.k().requires_grad
    budget.set_budget(3.0)  # keep the learned shares, move K
    check_exact(budget.k(), budget)
    torch.testing.assert_close((budget.k() - 1.0) / 2.0, shares / 1.0, rtol=1e-5, atol=1e-6)
    budget.set_budget(2.0, per_layer=[1.5, 2.0, 2.5])
    torch.testing.assert_close(budget.k(), torch.tensor([1.5, 2.0, 2.5]))
    state = budget.state_dict()
    restored = Budget(3, 8, 2.0)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.k(), budget.k())
    budget.set_budget(2.0)  # unpins
    torch.testing.assert_close(budget.k() - 1.0, shares, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=0, num_experts=8, budget=2.0), "num_layers=0"),
    (dict(num_layers=2, num_experts=8, budget=8.0), "budget=8.0"),
    (dict(num_layers=2, num_experts=8, budget=0.5), "budget=0.5"),
    (dict(num_layers=2, num_experts=8, budget=2.0, k_min=0.0), "k_min=0.0"),
    (dict(num_layers=2, num_experts=8, budget=2.0, mode="lagrange"), "mode='lagrange'"),
    (dict(num_layers=2, num_experts=1, budget=1.0), r"k_min=1.0 .* \(0.0, 0.5\]"),
    (dict(num_layers=2, num_experts=8, budget=1.0, mode="penalty"), "strictly inside"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=2.0, num_experts=8, budget=2.0), "num_layers=2.0 must be an int >= 1"),
    (dict(num_layers=2, num_experts=True, budget=2.0), "num_experts=True must be an int >= 1"),
    (dict(num_layers=2, num_experts=8, budget=2.0, learnable=0), r"learnable must be a bool, got int \(0\)"),
])
def test_arguments_of_the_wrong_type_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        Budget(**kwargs)


def test_bad_dial_raises():
    budget = Budget(2, 8, 2.0)
    with pytest.raises(ValueError, match="num_layers=2"):
        budget.set_budget(2.0, per_layer=[2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="mean"):
        budget.set_budget(2.0, per_layer=[2.0, 3.0])
    with pytest.raises(ValueError, match=r"per_layer\[1\]=9.0"):
        budget.set_budget(5.0, per_layer=[1.0, 9.0])


def test_allocation_moves_to_the_layer_that_needs_more_experts(one_thread):
    # Layer A's target is the mean of all 4 of its experts; layer B's is its expert 0 alone. With the
    # unnormalised combine (w = p * softmax(r), sum w <= 1 with equality only if every p = 1), A
    # can only reach its target with more active experts, B is served by one. Experts are frozen;
    # the routers and the budget learn. K = 2: the budget should shift from B to A.
    torch.manual_seed(0)
    d, num_tokens = 8, 128
    budget = Budget(2, 4, 2.0, k_min=1.0, margin=0.5)
    # Our earlier truncation (min_weight): with E = 4 the paper's relative threshold 1.8 k / E exceeds
    # every p once k > 2.2 and keeps one expert, which would hide the realized count this test reads.
    layers = [MoELayer(d, 16, 4, router="softmoe", combine="mask_softmax_raw", alpha=0.5, min_weight=0.05,
                       truncation="min_weight",
                       lb_coef=0.0, z_coef=0.0) for _ in range(2)]
    x = torch.randn(num_tokens, 1, d)
    with torch.no_grad():
        target_a = expert_outputs(layers[0], x.reshape(-1, d)).mean(1).reshape(x.shape)
        target_b = expert_outputs(layers[1], x.reshape(-1, d))[:, 0].reshape(x.shape)
    params = [budget.theta] + [layer.router.gate.weight for layer in layers]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(40):
        k_L = budget.k()
        out_a, out_b = layers[0](x, mean_k=k_L[0]), layers[1](x, mean_k=k_L[1])
        loss = (out_a.output - target_a).square().mean() + (out_b.output - target_b).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    k_a, k_b = budget.k().tolist()
    check_exact(budget.k(), budget)
    assert k_a > 2.5 and k_b < 1.5, (k_a, k_b)
    assert out_a.stats["active_experts_mean"] > out_b.stats["active_experts_mean"]


def test_steer_moves_each_layer_threshold_towards_its_own_k():
    """Realized mode: layer l's threshold falls when its count is below k_l, rises when above, within [0, E]."""
    from softmoe.routing.budget import steer_threshold

    budget = Budget(3, 8, 2.0, realized=True, realized_rate=0.5)
    thresholds = [torch.tensor(1.8), torch.tensor(1.8), torch.tensor(0.1)]
    budget.steer(thresholds, torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64))
    assert [round(float(t), 6) for t in thresholds] == [1.3, 2.3, 1.6]  # 1.8 -+ 0.5 * (2 - AE)
    assert float(steer_threshold(torch.tensor(0.2), torch.tensor(9.0), 1.0, 1.0, 8.0)) == 8.0  # bounded by E
    assert float(steer_threshold(torch.tensor(0.2), torch.tensor(1.0), 5.0, 1.0, 8.0)) == 0.0
    with pytest.raises(ValueError, match="steer got 2 thresholds, expected num_layers=3"):
        budget.steer(thresholds[:2], torch.ones(2))
    with pytest.raises(ValueError, match="realized_rate=0"):
        Budget(3, 8, 2.0, realized=True, realized_rate=0.0)
    with pytest.raises(TypeError, match="realized must be a bool"):
        Budget(3, 8, 2.0, realized=1)
