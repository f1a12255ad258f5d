"""Between-step controllers: ReMoE's multiplicative L1 coefficient, DeepSeek-V3's loss-free bias and the
active-experts target (its threshold and budget levers).

The update rules move in the right direction; the hook pools sparsity over all ReMoE layers, drops the
counts of skipped steps and never moves anything in eval mode; the state round-trips through
state_dict; on a short toy training the ReMoE controller moves sparsity towards 1 - k/E; the loss-free
bias balances a skewed router, changes selection only (never the combine weights), and rejects bad
options by name.

Run: .venv/bin/python -m pytest -q tests/unit/train/test_controllers.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from softmoe.studies.summaries import trajectories
from softmoe.layers import MoELayer
from softmoe.model import GPT
from softmoe.model.config import ModelConfig
from softmoe.ops.lapsum import soft_topk
from softmoe.routing import build_router
from softmoe.routing.diagnostics import RoutingCounts
from softmoe.routing.softk import combine_weights, relative_keep
from softmoe.train import controllers
from softmoe.train.config import load_run_config
from softmoe.train.loop import Trainer
from softmoe.train.metrics import read_metrics
from tests.reference import dense_moe as ref

D, H, E = 16, 32, 8
TINY_REMOE = Path(__file__).resolve().parents[3] / "configs" / "tiny" / "remoe.yaml"


def remoe_layers(n: int = 2, k: float = 2.0, lambda_init: float = 1e-3) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(MoELayer(D, H, E, router="remoe", k=k, lambda_init=lambda_init) for _ in range(n))


def coefs(model: nn.Module) -> list[float]:
    return [float(m.router.l1_coef) for m in model.modules() if isinstance(m, MoELayer)]


# ---- ReMoE: the multiplicative controller ----


def test_multiplicative_update_direction():
    coef = torch.tensor(1e-3)
    up = controllers.multiplicative_update(coef, torch.tensor(0.5), 0.75, 1.2)  # too dense: penalise more
    down = controllers.multiplicative_update(coef, torch.tensor(0.9), 0.75, 1.2)  # too sparse: penalise less
    same = controllers.multiplicative_update(coef, torch.tensor(0.75, dtype=torch.float64), 0.75, 1.2)
    assert float(up) == pytest.approx(1.2e-3) and float(down) == pytest.approx(1e-3 / 1.2)
    assert float(same) == pytest.approx(1e-3) and up.dtype == torch.float32


def forward_counts(layers, x, counts: RoutingCounts | None = None) -> RoutingCounts:
    """Run every layer on x and add their returned statistics to a RoutingCounts (what the Trainer does)."""
    counts = RoutingCounts() if counts is None else counts
    counts.add({i: layer(x).stats for i, layer in enumerate(layers)})
    return counts


def test_step_pools_sparsity_over_layers():
    model = remoe_layers()
    x = torch.randn(4, 8, D)
    counts = forward_counts(model, x)
    routed = sum(float(c["expert_counts"].sum()) for c in counts.layers)
    sparsity = 1 - routed / (2 * 32 * E)
    layers = [(m.router, c) for m, c in zip(model, counts.layers)]
    assert float(controllers.pooled_sparsity(layers)) == pytest.approx(sparsity)
    expected = 1e-3 * (1.2 if sparsity < 0.75 else 1 / 1.2)
    controllers.step(model, counts)
    assert coefs(model) == pytest.approx([expected, expected])  # one decision for all layers
    controllers.step(model, RoutingCounts())  # nothing counted: no update
    controllers.step(model, None)
    assert coefs(model) == pytest.approx([expected, expected])


def test_sparse_layers_lower_the_coefficient():
    model = remoe_layers(k=6.0)  # target 0.25; random ReLU gates are ~half zero
    controllers.step(model, forward_counts(model, torch.randn(4, 8, D)))
    assert coefs(model)[0] == pytest.approx(1e-3 / 1.2)


def test_skipped_step_and_eval_mode_do_not_move_the_coefficient():
    model = remoe_layers()
    x = torch.randn(4, 8, D)
    controllers.step(model, forward_counts(model, x), update=False)  # a skipped (non-finite) step
    assert coefs(model) == [pytest.approx(1e-3)] * 2
    model.eval()
    for _ in range(3):
        controllers.step(model, forward_counts(model, x))
    assert coefs(model) == [pytest.approx(1e-3)] * 2


def test_no_router_keeps_a_counter_and_a_forward_changes_no_module_state():
    """Counts are return values: a training forward leaves every buffer and attribute of every router as it was."""
    for router, options in (("remoe", {}), ("topk", {"loss_free_bias": True}), ("softmoe", {"loss_free_bias": True})):
        layer = MoELayer(D, H, E, router=router, k=2.0, **options)
        before = {name: b.clone() for name, b in layer.named_buffers()}
        attrs = dict(vars(layer.router))
        layer(torch.randn(3, 5, D))
        assert all(torch.equal(before[name], b) for name, b in layer.named_buffers()), router
        assert vars(layer.router).keys() == attrs.keys()


def test_state_dict_round_trip_restores_the_coefficient_and_bias():
    config = ModelConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, num_experts=4, d_expert=8,
                         router="remoe", k=1.0, max_seq_len=16, router_options=dict(lambda_init=1e-3))
    torch.manual_seed(0)
    model = GPT(config)
    for _ in range(3):
        counts = RoutingCounts()
        counts.add(model(torch.randint(0, 32, (2, 8))).routing)
        controllers.step(model, counts)
    state = model.state_dict()
    assert "blocks.0.ffn.router.l1_coef" in state
    fresh = GPT(config)
    assert float(fresh.blocks[0].ffn.router.l1_coef) == pytest.approx(1e-3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.blocks[1].ffn.router.l1_coef, model.blocks[1].ffn.router.l1_coef)
    assert float(fresh.blocks[1].ffn.router.l1_coef) != pytest.approx(1e-3)

    biased = ModelConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, num_experts=4, d_expert=8, router="topk",
                         k=1.0, max_seq_len=16, router_options=dict(loss_free_bias=True, bias_update_rate=0.1))
    model = GPT(biased)
    counts = RoutingCounts()
    counts.add(model(torch.randint(0, 32, (2, 8))).routing)
    controllers.step(model, counts)
    fresh = GPT(biased)
    fresh.load_state_dict(model.state_dict())
    bias = model.blocks[0].ffn.router.balance.bias_E
    assert bias.abs().sum() > 0 and torch.equal(fresh.blocks[0].ffn.router.balance.bias_E, bias)


def test_toy_training_moves_sparsity_towards_target(tmp_path):
    # k = 1 of 4: target 0.75, while random ReLU gates start near 0.5 sparsity.
    config = load_run_config(TINY_REMOE, [
        f"train.out_dir={tmp_path}", f"data.data_dir={tmp_path / 'data'}", "train.progress=false",
        "train.tensorboard=false", "model.k=1", "model.router_options.lambda_init=1.0e-3", "train.steps=40",
        "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0"])
    result = Trainer(config, report=lambda _m: None).fit()
    records = read_metrics(result.run_dir, "train")
    sparsity = [sum(layer["sparsity"] for layer in r["layers"]) / len(r["layers"]) for r in records]
    first, last = sum(sparsity[:3]) / 3, sum(sparsity[-5:]) / 5
    assert first < 0.7
    assert abs(last - 0.75) < abs(first - 0.75)  # direction, not timing
    assert records[-1]["layers"][0]["l1_coef"] > 1e-3  # the controller raised lambda to get there


# ---- Loss-free balancing bias ----


def test_bias_update_direction():
    bias = torch.zeros(4)
    new = controllers.bias_update(bias, torch.tensor([10, 2, 2, 2]), 1e-3)  # mean 4
    torch.testing.assert_close(new, torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3]))
    torch.testing.assert_close(controllers.bias_update(bias, torch.tensor([3, 3, 3, 3]), 1e-3), bias)


def skewed_layer(router: str, rate: float, k: float) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, H, 4, router=router, k=k, loss_free_bias=True, bias_update_rate=rate)
    with torch.no_grad():
        layer.router.gate.weight.mul_(0.3)
        layer.router.gate.weight[0] += 1.0  # expert 0 scores sum(x), high for inputs with positive mean
    return layer


@pytest.mark.parametrize("router,rate,k", [("topk", 0.02, 1.0), ("softmoe", 0.05, 1.0)])
def test_bias_moves_towards_balance_on_skewed_input(router, rate, k):
    layer = skewed_layer(router, rate, k)
    x = torch.randn(8, 16, D) * 0.5 + 0.3
    start = layer(x).stats["expert_load"].clone()
    assert float(start[0]) > 0.5  # skewed
    for _ in range(60):
        controllers.step(layer, forward_counts([layer], x))
    end = layer(x).stats["expert_load"]
    bias = layer.router.balance.bias_E
    assert float(end.max()) < float(start.max()) - 0.2
    assert float(bias[0]) < 0 and float(bias[0]) == float(bias.min())


def test_topk_bias_changes_selection_not_combine_weights():
    layer = MoELayer(D, H, E, router="topk", k=2.0, loss_free_bias=True)
    x = torch.randn(40, D)
    with torch.no_grad():
        layer.router.balance.bias_E[3] = 10.0  # expert 3 wins every selection
    routing = layer.router(x).routing
    weight = routing.dense_weights()
    assert bool((weight[:, 3] > 0).all())
    torch.testing.assert_close(weight, ref.biased_topk_weights(layer, x), rtol=0, atol=1e-6)
    # The weights are the unbiased probabilities of the picks, renormalised: no bias in them.
    probs = torch.softmax(x @ layer.router.gate.weight.t(), -1).detach()
    picked = weight > 0
    torch.testing.assert_close(weight, torch.where(picked, probs, 0.0) / (probs * picked).sum(-1, keepdim=True))
    assert layer.router.balance.bias_E.grad is None and not layer.router.balance.bias_E.requires_grad


def test_zero_bias_routes_like_no_bias():
    for router in ("topk", "softmoe"):
        torch.manual_seed(0)
        plain = MoELayer(D, H, E, router=router, k=2.0)
        torch.manual_seed(0)
        biased = MoELayer(D, H, E, router=router, k=2.0, loss_free_bias=True)
        x = torch.randn(3, 5, D)
        assert torch.equal(plain(x).output, biased(x).output)


def test_softmoe_bias_changes_truncation_not_combine_weights():
    router = build_router("softmoe", D, E, 2.0, loss_free_bias=True, min_weight=0.2)
    x = torch.randn(40, D)
    with torch.no_grad():
        router.balance.bias_E[5] = 20.0
    out = router(x)
    weight = out.routing.dense_weights()
    keep = weight > 0
    assert bool(keep[:, 5].all())
    logits = out.logits_TE
    k = torch.tensor(2.0)
    p = soft_topk(logits, k, router.alpha)  # unbiased soft top-k
    expected = combine_weights(p, logits, keep, k, router.config.combine)
    torch.testing.assert_close(weight, torch.where(keep, expected, 0.0).detach(), rtol=0, atol=1e-6)
    # Without the bias, expert 5 is not kept for every token: the bias changed the selection.
    with torch.no_grad():
        router.balance.bias_E.zero_()
    assert not bool((router(x).routing.dense_weights()[:, 5] > 0).all())


def test_bias_frozen_in_eval_and_on_skipped_steps():
    layer = skewed_layer("topk", 0.1, 1.0)
    x = torch.randn(4, 8, D) + 0.3
    controllers.step(layer, forward_counts([layer], x), update=False)
    assert torch.equal(layer.router.balance.bias_E, torch.zeros(4))
    layer.eval()
    controllers.step(layer, forward_counts([layer], x))
    assert torch.equal(layer.router.balance.bias_E, torch.zeros(4))


@pytest.mark.parametrize("router,options,error,match", [
    ("topk", dict(bias_update_rate=0.0), ValueError, r"bias_update_rate=0.0 must be"),
    ("topk", dict(bias_update_rate=-1e-3), ValueError, r"bias_update_rate=-0.001"),
    ("softmoe", dict(bias_update_rate=float("nan")), ValueError, r"bias_update_rate=nan"),
    ("softmoe", dict(bias_update_rate="fast"), TypeError, r"bias_update_rate must be a float"),
    ("topk", dict(loss_free_bias=1), TypeError, r"loss_free_bias must be a bool, got int \(1\)"),
    ("topp", dict(loss_free_bias=True), ValueError, r"unknown option\(s\) \['loss_free_bias'\]"),
])
def test_bad_bias_options_raise_naming_the_argument(router, options, error, match):
    with pytest.raises(error, match=match):
        build_router(router, D, E, 2.0, **options)


# ---- the active-experts target: an integral controller on the routers' threshold or the budget K ----


def test_budget_update_direction_and_bounds():
    K = torch.tensor(2.0)
    up = controllers.budget_update(K, torch.tensor(1.0), 2.0, 0.1, 1.0, 7.5)  # too few active: raise K
    down = controllers.budget_update(K, torch.tensor(3.0), 2.0, 0.1, 1.0, 7.5)
    assert float(up) == pytest.approx(2.1) and float(down) == pytest.approx(1.9) and up.dtype == K.dtype
    assert float(controllers.budget_update(K, torch.tensor(100.0), 2.0, 0.1, 1.0, 7.5)) == 1.0  # saturates at k_min
    assert float(controllers.budget_update(K, torch.tensor(-100.0), 2.0, 0.1, 1.0, 7.5)) == 7.5


def test_threshold_update_direction_and_bounds():
    thr = torch.tensor(1.8)
    lower = controllers.threshold_update(thr, torch.tensor(1.0), 2.0, 0.1, 16.0)  # too few active: lower it
    higher = controllers.threshold_update(thr, torch.tensor(3.0), 2.0, 0.1, 16.0)
    assert float(lower) == pytest.approx(1.7) and float(higher) == pytest.approx(1.9) and lower.dtype == thr.dtype
    assert float(controllers.threshold_update(thr, torch.tensor(-100.0), 2.0, 0.1, 16.0)) == 0.0  # keep m
    assert float(controllers.threshold_update(thr, torch.tensor(900.0), 2.0, 0.1, 16.0)) == 16.0  # keep 1


def test_the_threshold_bounds_span_one_to_m_experts():
    """At the lower bound 0 every token keeps its cap m; at the upper bound E only its top expert."""
    torch.manual_seed(0)
    k = torch.tensor(1.5)
    p_TE = soft_topk(torch.randn(64, E) * 3, k, torch.tensor(1.0))
    m = 3  # ceil(1.5 * 2)
    assert (relative_keep(p_TE, k, torch.tensor(0.0), 2.0).sum(-1) == m).all()
    assert (relative_keep(p_TE, k, torch.tensor(float(E)), 2.0).sum(-1) == 1).all()


def test_active_experts_target_rejects_bad_settings():
    for bad in (0.0, 0.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match=f"ActiveExpertsTarget.target={bad} must be a finite number >= 1"):
            controllers.ActiveExpertsTarget(bad, 0.1)
    for bad in (True, "2"):
        with pytest.raises(TypeError, match=f"ActiveExpertsTarget.target must be a float, got .* {bad!r}"):
            controllers.ActiveExpertsTarget(bad, 0.1)
    with pytest.raises(ValueError, match="ActiveExpertsTarget.rate=0 must be a finite number > 0"):
        controllers.ActiveExpertsTarget(2.0, 0)
    with pytest.raises(ValueError, match="ActiveExpertsTarget.lever='alpha' must be one of"):
        controllers.ActiveExpertsTarget(2.0, 0.1, "alpha")
    with pytest.raises(ValueError, match="ActiveExpertsTarget.k_max=-1.0 must be a finite number > 0"):
        controllers.ActiveExpertsTarget(2.0, 0.1, "budget", k_max=-1.0)
    with pytest.raises(TypeError, match="ActiveExpertsTarget.k_max must be a float, got bool True"):
        controllers.ActiveExpertsTarget(2.0, 0.1, "budget", k_max=True)
    with pytest.raises(ValueError, match="ActiveExpertsTarget.k_max=4.0 bounds K, but lever='threshold'"):
        controllers.ActiveExpertsTarget(2.0, 0.1, "threshold", k_max=4.0)
    preset = TINY_REMOE.parent / "softmoe.yaml"
    with pytest.raises(ValueError, match="train.ae_rate=0"):
        load_run_config(preset, ["train.ae_target=2", "train.ae_rate=0", "train.ae_lever=threshold"])
    with pytest.raises(ValueError, match="train.ae_target=-1"):
        load_run_config(preset, ["train.ae_target=-1"])
    with pytest.raises(ValueError, match=r"train.ae_target=0.5 must be 0 \(off\) or >= 1"):
        load_run_config(preset, ["train.ae_target=0.5"])
    with pytest.raises(ValueError, match="train.ae_lever='alpha' must be one of"):
        load_run_config(preset, ["train.ae_target=2", "train.ae_lever=alpha"])
    with pytest.raises(ValueError, match=r"train.ae_lever='' must be one of .*runs configured before 2026-12-02 moved K"):
        load_run_config(preset, ["train.ae_target=2"])  # no default: an old config must not change its lever
    # run configs of 2026-12-01/02 carry the then-default lever without a target: it resolves to none
    assert load_run_config(preset, ["train.ae_lever=threshold"]).train.ae_lever == ""
    with pytest.raises(ValueError, match="train.ae_k_max=4.0 bounds the budget K: it needs train.ae_lever=budget "
                                         "\\(got 'threshold'\\)"):
        load_run_config(preset, ["train.ae_target=2", "train.ae_lever=threshold", "train.ae_k_max=4"])


@pytest.mark.parametrize("preset, extra, message", [
    ("topk.yaml", ["train.ae_lever=threshold"], "threshold of SoftMoE routers, but this model has none"),
    ("softmoe.yaml", ["train.ae_lever=threshold", "model.router_options.truncation=min_weight"],
     "but this model has none"),
    ("topk.yaml", ["train.ae_lever=budget"], "no budget"),
    ("softmoe.yaml", ["train.ae_lever=budget", "model.budget_options.mode=penalty"], "mode 'penalty'"),
])
def test_ae_target_needs_its_lever_in_the_model(tmp_path, preset, extra, message):
    config = load_run_config(TINY_REMOE.parent / preset, [
        f"train.out_dir={tmp_path}", f"data.data_dir={tmp_path / 'data'}", "train.ae_target=2", *extra])
    with pytest.raises(ValueError, match=message):
        Trainer(config, report=lambda m: None)


def _tiny_softmoe() -> GPT:
    return GPT(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=8, d_expert=16,
                           router="softmoe", k=2.0))


def fake_counts(active_L: list[float], num_experts: int = 8, tokens: float = 64.0) -> RoutingCounts:
    """RoutingCounts whose layers realized `active_L` experts per token (pairs spread evenly over the experts)."""
    counts = RoutingCounts()
    counts.add({i: {"expert_counts": torch.full((num_experts,), a * tokens / num_experts, dtype=torch.float64),
                    "real_tokens": torch.tensor(tokens, dtype=torch.float64)} for i, a in enumerate(active_L)})
    return counts


def test_ae_step_moves_the_threshold_of_every_router_only_in_training_and_for_good_steps():
    model = _tiny_softmoe()
    routers = controllers.thresholded_routers(model)
    assert len(routers) == 2 and all(float(r.threshold) == pytest.approx(1.8) for r in routers)
    target = controllers.ActiveExpertsTarget(3.0, 0.5)  # the threshold lever is the default
    active = fake_counts([0.5, 1.5])  # mean over layers 1.0
    budget_before = float(model.budget.budget)
    model.train()
    controllers.step(model, active, update=False, ae_target=target)  # a skipped step
    assert all(float(r.threshold) == pytest.approx(1.8) for r in routers)
    controllers.step(model, active, ae_target=target)
    assert all(float(r.threshold) == pytest.approx(1.8 - 0.5 * (3.0 - 1.0)) for r in routers)
    assert float(model.budget.budget) == budget_before  # K is not this lever
    model.eval()
    controllers.step(model, active, ae_target=target)
    assert all(float(r.threshold) == pytest.approx(0.8) for r in routers)
    model.train()
    controllers.step(model, active, ae_target=target)
    assert all(float(r.threshold) == pytest.approx(0.0) for r in routers)  # clamped at 0


def test_the_threshold_resumes_from_a_state_dict_and_old_checkpoints_load_the_config_value():
    model = _tiny_softmoe()
    for r in controllers.thresholded_routers(model):
        r.threshold.fill_(1.25)
    state = model.state_dict()
    fresh = _tiny_softmoe()
    fresh.load_state_dict(state)  # strict
    assert all(float(r.threshold) == 1.25 for r in controllers.thresholded_routers(fresh))
    old = {name: value for name, value in state.items() if not name.endswith("router.threshold")}
    assert len(old) == len(state) - 2  # written before the buffer existed
    fresh.load_state_dict(old)  # strict: the pre-hook fills the missing key
    assert all(float(r.threshold) == pytest.approx(1.8) for r in controllers.thresholded_routers(fresh))


def test_a_moved_threshold_routes_like_a_router_built_with_that_threshold():
    """The buffer is the threshold the rule uses: a router whose buffer was moved to t routes exactly like one
    built with threshold=t, and keeps more experts than at the default 1.8."""
    torch.manual_seed(0)
    x = torch.randn(64, D)
    moved = build_router("softmoe", D, E, 2.0)
    default = build_router("softmoe", D, E, 2.0)
    default.load_state_dict(moved.state_dict())
    moved.threshold.fill_(1.2)
    built = build_router("softmoe", D, E, 2.0, threshold=1.2)
    built.load_state_dict(moved.state_dict())
    a, b, c = moved(x).routing, built(x).routing, default(x).routing
    for name in ("token_N", "expert_N", "weight_N", "counts_E"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert c.num_pairs < a.num_pairs


def test_ae_step_moves_budget_only_in_training_and_for_good_steps():
    model = _tiny_softmoe()
    target = controllers.ActiveExpertsTarget(3.0, 0.5, "budget")
    active = fake_counts([1.0, 1.0])
    model.train()
    controllers.step(model, active, update=False, ae_target=target)  # a skipped step
    assert float(model.budget.budget) == 2.0
    controllers.step(model, active, ae_target=target)
    assert float(model.budget.budget) == pytest.approx(2.0 + 0.5 * (3.0 - 1.0))
    assert float(model.budget().detach().mean()) == pytest.approx(3.0, abs=1e-5)  # the k_l follow K
    assert all(float(r.threshold) == pytest.approx(1.8) for r in controllers.thresholded_routers(model))
    model.eval()
    controllers.step(model, active, ae_target=target)
    assert float(model.budget.budget) == pytest.approx(3.0)


def _ae_run(tmp_path, *extra: str) -> tuple[Trainer, list[dict]]:
    config = load_run_config(TINY_REMOE.parent / "softmoe.yaml", [
        f"train.out_dir={tmp_path}", f"data.data_dir={tmp_path / 'data'}", "train.progress=false",
        "train.tensorboard=false", "train.steps=80", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0",
        *extra])
    trainer = Trainer(config, report=lambda m: None)
    trainer.fit()
    return trainer, read_metrics(config.train.run_dir, "train")


def _tail_mean(records: list[dict], after: int) -> float:
    tail = [r["active_experts_mean"] for r in records if r["step"] > after]
    return sum(tail) / len(tail)


def test_ae_target_holds_realized_train_ae_on_a_tiny_run_by_the_threshold(tmp_path):
    """The stated tolerance: the mean realized Train AE over steps 61-80 of an 80-step tiny run with the
    paper's rule (alpha 1, threshold 1.8) is within 0.1 of the target; it starts 0.5+ away (a fresh router
    keeps about one expert per token)."""
    target = 2.0
    trainer, records = _ae_run(tmp_path, f"train.ae_target={target}", "train.ae_rate=0.05", "train.ae_lever=threshold")
    assert abs(_tail_mean(records, 60) - target) < 0.1, [r["active_experts_mean"] for r in records]
    assert target - records[0]["active_experts_mean"] > 0.5  # it had somewhere to go
    thresholds = {float(r.threshold) for r in controllers.thresholded_routers(trainer.model)}
    assert len(thresholds) == 1 and thresholds.pop() < 1.8 - 0.2  # one threshold, moved down
    assert float(trainer.model.budget.budget) == 2.0  # K untouched
    logged = [r["layers"][0]["threshold"] for r in records]  # the threshold each step routed with
    assert logged[0] == pytest.approx(1.8) and min(logged) < 1.6
    assert all(layer["threshold"] == r["layers"][0]["threshold"] for r in records for layer in r["layers"])
    assert trajectories(trainer.config.train.run_dir)[1]["threshold"] == logged  # what a study summary keeps


def test_ae_target_holds_realized_train_ae_on_a_tiny_run_by_the_budget(tmp_path):
    """The budget lever on a hard router (alpha 0.2: the tiny router is too flat for alpha 1 to keep more than
    one expert at any K): within 0.1 of the target over steps 61-80; it starts 0.3+ away."""
    target = 1.4
    trainer, records = _ae_run(tmp_path, f"train.ae_target={target}", "train.ae_rate=0.1", "train.ae_lever=budget",
                               "train.ae_k_max=4", "model.router_options.alpha=0.2")
    assert abs(_tail_mean(records, 60) - target) < 0.1, [r["active_experts_mean"] for r in records]
    assert records[0]["active_experts_mean"] - target > 0.3  # it had somewhere to go
    assert float(trainer.model.budget.budget) < 2.0 - 0.2  # by moving K down


def test_an_unreachable_ae_target_saturates_at_ae_k_max(tmp_path):
    """A target the routing cannot reach drives K to the cap and no further (never past it)."""
    trainer, records = _ae_run(tmp_path, "train.ae_target=6", "train.ae_rate=0.5", "train.ae_lever=budget",
                               "train.ae_k_max=3", "model.router_options.alpha=0.2")
    assert float(trainer.model.budget.budget) == pytest.approx(3.0)
    assert max(sum(r["layers"][i]["k"] for i in range(2)) / 2 for r in records) <= 3.0 + 1e-5


def test_an_unreachable_ae_target_keeps_every_token_at_its_cap(tmp_path):
    """A target above every token's cap m = ceil(k_l c) drives the threshold to 0 and no further; there every
    token keeps exactly its cap (c = 2, E = 8)."""
    trainer, records = _ae_run(tmp_path, "train.ae_target=7", "train.ae_rate=0.5", "train.ae_lever=threshold")
    assert all(float(r.threshold) == 0.0 for r in controllers.thresholded_routers(trainer.model))
    last = records[-1]["layers"]
    assert all(layer["threshold"] == 0.0 for layer in last)  # the last step routed at the bound
    assert [layer["active_experts_mean"] for layer in last] == pytest.approx(
        [min(math.ceil(2 * layer["k"]), 8) for layer in last])


def test_the_realized_budget_needs_the_relative_threshold_and_excludes_ae_target(tmp_path):
    with pytest.raises(ValueError, match="realized=true steers the paper's relative threshold"):
        ModelConfig(router="softmoe", budget_options={"realized": True}, router_options={"truncation": "min_weight"})
    with pytest.raises(ValueError, match="realized=true steers the paper's relative threshold"):
        ModelConfig(router="topk", budget_options={"realized": True})
    config = load_run_config(TINY_REMOE.parent / "softmoe.yaml", [
        f"train.out_dir={tmp_path}", f"data.data_dir={tmp_path / 'data'}", "model.budget_options.realized=true",
        "train.ae_target=2", "train.ae_lever=threshold"])
    with pytest.raises(ValueError, match="would both steer the realized count"):
        Trainer(config, report=lambda m: None)
    described = ModelConfig(router="softmoe", k=1.5, num_experts=16, budget_options={"realized": True})
    assert described.describe_routing() == "realized count K=1.5 of 16, learned k_l"


def test_step_steers_the_realized_budget_per_layer_only_for_good_training_steps():
    model = GPT(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=8, d_expert=16,
                            router="softmoe", k=2.0, budget_options={"realized": True, "realized_rate": 0.5}))
    routers = controllers.thresholded_routers(model)
    active = fake_counts([1.0, 3.0])
    model.train()
    controllers.step(model, active, update=False)
    assert [float(r.threshold) for r in routers] == pytest.approx([1.8, 1.8])
    controllers.step(model, active)
    assert [float(r.threshold) for r in routers] == pytest.approx([1.3, 2.3])
    with pytest.raises(ValueError, match="1 layers counted, but the model has 2 routers"):
        controllers.step(model, fake_counts([1.0]))
