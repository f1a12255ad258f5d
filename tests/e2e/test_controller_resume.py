"""Exact resume with between-step controllers: ReMoE's L1 coefficient, the loss-free balancing bias and
the active-experts controller's threshold or budget K live in the model's state_dict, so a stopped-and-resumed run matches an uninterrupted one bit for bit.

Run: .venv/bin/python -m pytest -q tests/e2e/test_controller_resume.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.train.loop import Trainer
from tests.e2e.test_smoke import EXACT, assert_bitwise_equal, quiet, state_of, tiny

VARIANTS = {
    # lambda_init large enough that the L1 term changes the weights within 12 steps
    "remoe": ("remoe", ["model.router_options.lambda_init=1.0e-2"], "router.l1_coef"),
    "topk_bias": ("topk", ["model.router_options.loss_free_bias=true", "model.router_options.bias_update_rate=0.01"],
                  "router.balance.bias_E"),
    # the paper rule's training-only gate noise is drawn from the torch RNG, which checkpoints carry
    "softmoe_gate_noise": ("softmoe", ["model.router_options.gate_noise=0.5"], "router.gate.weight"),
    # the active-experts controller moves the routers' threshold, or the budget's K (persistent buffers), every step
    # (rate 0.05: the threshold is still inside its bounds at the stop, so the compared value is not a clamp)
    "softmoe_ae_threshold": ("softmoe", ["train.ae_target=3.0", "train.ae_rate=0.05", "train.ae_lever=threshold"],
                             "router.threshold"),
    "softmoe_ae_budget": ("softmoe", ["train.ae_target=3.0", "train.ae_rate=0.2", "train.ae_lever=budget"],
                          "budget.budget"),
    # the realized-count budget steers each router's own threshold towards its k_l every step
    "softmoe_realized_budget": ("softmoe", ["model.budget_options.realized=true"], "router.threshold"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resume_with_controller_is_bitwise_exact(tmp_path, name):
    variant, options, key = VARIANTS[name]
    data_dir = tmp_path / "data"
    straight = Trainer(tiny(tmp_path / "straight", data_dir, *EXACT, *options, variant=variant), report=quiet)
    straight.fit()
    reference = state_of(straight)
    controlled = [k for k in reference if k.endswith(key)]
    assert controlled, f"no {key} in the state_dict"
    initial = Trainer(tiny(tmp_path / "fresh", data_dir, *EXACT, *options, variant=variant), report=quiet)
    assert any(not torch.equal(reference[k], state_of(initial)[k]) for k in controlled)  # the controller moved

    config = tiny(tmp_path / "resumed", data_dir, *EXACT, *options, variant=variant)
    assert Trainer(config, report=quiet).fit(stop_after=6).step == 6
    resumed = Trainer(config, report=quiet)
    assert resumed.fit(resume=True).step == 12
    assert_bitwise_equal(state_of(resumed), reference)
