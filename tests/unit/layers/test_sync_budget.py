"""The host-sync budget of the hot path, counted on CPU with a dispatch-mode tracer (tests/reference/sync_counter.py).

With SOFTMOE_CHECKS=off (the default for CUDA tensors) and the device path of the layer (grouped experts, the
index_add per-token sums that CUDA takes), one SoftMoE MoE layer forward makes exactly one sync: the nonzero that
sizes the ragged dispatch, or none with a static bound (`dispatch_cap`). The CPU-only paths (the padded experts' shape, the token gather table) add syncs
that are free on CPU. A training step that does not log reads the device twice (the loss sums and the
gradient norm) plus that one sync per MoE layer; a log step adds the routing summary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from softmoe.layers import moe as moe_module
from softmoe.layers.moe import MoELayer
from tests.reference.sync_counter import SyncCounter

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.fixture
def device_path(monkeypatch):
    """SOFTMOE_CHECKS=off and the per-token sums CUDA takes (index_add), on CPU tensors."""
    monkeypatch.setenv("SOFTMOE_CHECKS", "off")
    monkeypatch.setattr(moe_module, "token_table", lambda routing: None)


@pytest.mark.parametrize("router", ["softmoe", "topk"])
def test_one_moe_layer_forward_makes_one_sync(device_path, router):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, router=router, k=2.0, experts_impl="grouped")
    x = torch.randn(2, 24, 16, requires_grad=True)
    with SyncCounter() as counter:
        y = layer(x).output
    assert counter.ops == ["nonzero"], counter.ops
    with SyncCounter() as counter:
        y.square().sum().backward()
    assert counter.ops == [], counter.ops
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("router", ["softmoe", "topk"])
def test_a_static_bound_makes_no_sync(device_path, router):
    """dispatch_cap sizes the routing at T * cap pairs: no sync in the layer's forward or backward, and the
    exact layer's output and gradients."""
    x = torch.randn(2, 24, 16)
    results = []
    for options in ({}, {"dispatch_cap": 4}):
        torch.manual_seed(0)
        layer = MoELayer(16, 32, 8, router=router, k=2.0, experts_impl="grouped", **options)
        x_in = x.clone().requires_grad_()
        layer(x_in)  # warm-up: the grouped_mm probe
        with SyncCounter() as counter:
            y = layer(x_in).output
            y.square().sum().backward()
        results.append((counter.ops, y, x_in.grad))
    (exact_ops, y_exact, g_exact), (static_ops, y_static, g_static) = results
    assert exact_ops == ["nonzero"] and static_ops == [], (exact_ops, static_ops)
    torch.testing.assert_close(y_static, y_exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_static, g_exact, rtol=1e-5, atol=1e-6)


def test_a_static_bound_too_small_is_a_device_assert(device_path):
    """With value checks off (CUDA's default) an overflowing static bound still stops the forward: a
    device-side assert (on CPU tensors it raises at once), never a silent drop of pairs."""
    layer = MoELayer(16, 32, 8, router="remoe", k=2.0, experts_impl="grouped", dispatch_cap=1)  # ~4 per token
    with pytest.raises(RuntimeError, match="more pairs than its static bound max_pairs=48"):
        layer(torch.randn(2, 24, 16))


def test_the_device_path_matches_the_cpu_path(monkeypatch):
    """index_add sums and grouped experts give the layer's CPU result (gather table, padded experts)."""
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, router="softmoe", k=2.0, experts_impl="padded")
    x = torch.randn(2, 24, 16, requires_grad=True)
    y_cpu = layer(x).output
    (g_cpu,) = torch.autograd.grad(y_cpu.square().sum(), x)
    monkeypatch.setattr(moe_module, "token_table", lambda routing: None)
    layer.experts.impl = "grouped"
    y_dev = layer(x).output
    (g_dev,) = torch.autograd.grad(y_dev.square().sum(), x)
    torch.testing.assert_close(y_dev, y_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_dev, g_cpu, rtol=1e-5, atol=1e-6)


def test_checks_on_cost_syncs_on_cpu(monkeypatch):
    """The default on CPU (checks on, gather table, padded experts) syncs more: free there, counted here."""
    monkeypatch.setenv("SOFTMOE_CHECKS", "on")
    layer = MoELayer(16, 32, 8, router="softmoe", k=2.0)
    with SyncCounter() as counter:
        layer(torch.randn(2, 24, 16))
    assert counter.count > 1


@pytest.mark.parametrize("static", [False, True], ids=["exact", "dispatch_cap"])
def test_training_step_sync_budget(device_path, tmp_path, static):
    """A non-log training step of the tiny preset (2 SoftMoE layers): 2 + 2 syncs, or only the loop's 2 with a
    static bound (model.router_options.dispatch_cap); a log step reads more."""
    from softmoe.train.config import load_run_config
    from softmoe.train.loop import Trainer

    config = load_run_config(CONFIGS / "tiny" / "softmoe.yaml", [
        f"train.out_dir={tmp_path}", f"data.data_dir={tmp_path / 'data'}", "train.progress=false",
        "train.tensorboard=false", "train.device=cpu", *(["model.router_options.dispatch_cap=8"] if static else [])])
    trainer = Trainer(config, report=lambda message: None)
    for layer in trainer.model.modules():
        if isinstance(layer, MoELayer):
            layer.experts.impl = "grouped"
    num_moe = sum(isinstance(m, MoELayer) for m in trainer.model.modules())
    trainer.train_step(0)  # warm-up: the grouped_mm probe and lazy state
    # AdamW reads its step counters with .item(): they live on the host (CPU tensors) also for CUDA
    # parameters, so those reads never wait for the device; the step runs outside the counter.
    assert all(state["step"].device.type == "cpu" for state in trainer.optimizer.state.values())
    optimizer_step = trainer.optimizer.step

    def step_uncounted(*args, **kwargs):
        with _disable_current_modes():
            return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = step_uncounted
    with SyncCounter() as counter:
        stats = trainer.train_step(1, summarize=False)
    assert not stats.skipped and stats.layers == []
    per_layer = [] if static else ["nonzero"] * num_moe
    assert sorted(counter.ops) == sorted(per_layer + ["tolist", "_local_scalar_dense"]), counter.ops
    with SyncCounter() as counter:
        stats = trainer.train_step(2, summarize=True)
    assert len(stats.layers) == num_moe and counter.count > 2 + len(per_layer)


def test_budget_reads_its_pin_once_per_change(monkeypatch):
    """The Budget's forward reads `pinned` from the device only after the buffer changed: set_budget,
    load_state_dict and an in-place copy (eval/budget.py's restore) are all seen; inference_mode buffers work."""
    from softmoe.routing.budget import Budget

    monkeypatch.setenv("SOFTMOE_CHECKS", "off")
    budget = Budget(3, 8, 2.0)
    budget.k()
    with SyncCounter() as counter:
        budget.k()
    assert counter.ops == []
    budget.set_budget(2.0, per_layer=[1.5, 2.0, 2.5])
    assert budget.k().tolist() == [1.5, 2.0, 2.5]
    budget.pinned.copy_(torch.tensor(False))  # what a saved-buffer restore does
    assert budget.k().tolist() == [2.0, 2.0, 2.0]
    other = Budget(3, 8, 2.0)
    other.k()
    pinned_state = {**budget.state_dict(), "pinned": torch.tensor(True)}
    other.load_state_dict(pinned_state)
    assert other.k().tolist() == [1.5, 2.0, 2.5]
    with torch.inference_mode():
        assert Budget(3, 8, 2.0).k().tolist() == [2.0, 2.0, 2.0]
