"""MoELayer: equals the naive dense oracle for top-k and every SoftMoE combine mode; gradients reach the
router, k_l and alpha; edge shapes (single token, E = 1, E >> tokens); clear errors. Batch, decoding and
padding invariance of every router: tests/unit/routing/test_router_conformance.py.

Run: .venv/bin/python -m pytest -q tests/unit/layers/test_moe_layer.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.layers import MoELayer, SwiGLU
from softmoe.routing import Budget
from tests.reference import dense_moe as ref

D, H, E = 16, 32, 8

# name -> (router, k, options, mean_k given by a "budget" or None)
EARLIER = dict(alpha=0.1, truncation="min_weight", min_weight=0.05)  # our rule before the paper's

CASES = {
    "switch_k1": ("topk", 1.0, dict(normalize=False), None),
    "gshard_k2": ("topk", 2.0, dict(normalize=False), None),
    "mixtral_k2": ("topk", 2.0, dict(normalize=True), None),
    "softmoe_paper": ("softmoe", 2.0, dict(), None),
    "softmoe_paper_budget_k": ("softmoe", 2.0, dict(), 1.3),
    "softmoe_paper_max_active": ("softmoe", 1.5, dict(max_active=2, threshold=0.5), None),
    "softmoe_mask_softmax": ("softmoe", 2.0, dict(EARLIER, combine="mask_softmax"), None),
    "softmoe_mask_softmax_raw": ("softmoe", 2.0, dict(EARLIER, combine="mask_softmax_raw"), None),
    "softmoe_p": ("softmoe", 2.0, dict(EARLIER, combine="p"), None),
    "softmoe_max_active": ("softmoe", 2.5, dict(EARLIER, max_active=2, alpha=0.5), None),
    "softmoe_budget_k": ("softmoe", 2.0, dict(EARLIER), 3.3),
}


def make_layer(case: str, impl: str = "padded", seed: int = 0) -> tuple[MoELayer, torch.Tensor | None]:
    router, k, options, mean_k = CASES[case]
    torch.manual_seed(seed)
    layer = MoELayer(D, H, E, router=router, k=k, experts_impl=impl, **options)
    return layer, None if mean_k is None else torch.tensor(mean_k)


def reference_weights(layer: MoELayer, x_TD: torch.Tensor, mean_k) -> torch.Tensor:
    if layer.router.name == "topk":
        return ref.topk_weights(layer, x_TD)
    return ref.softk_weights(layer, x_TD, float(layer.router.config.k if mean_k is None else mean_k))


@pytest.mark.parametrize("impl", ["padded", "grouped", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_equals_dense_reference(case, impl):
    layer, mean_k = make_layer(case, impl)
    x = torch.randn(3, 7, D)
    y = layer(x, mean_k=mean_k).output
    weight_TE = reference_weights(layer, x.reshape(-1, D), mean_k)
    routed = layer.router(x.reshape(-1, D), k=mean_k).routing
    torch.testing.assert_close(routed.dense_weights(), weight_TE, rtol=0, atol=1e-6)
    torch.testing.assert_close(y, ref.dense_moe(layer, x, weight_TE), rtol=0, atol=1e-5)


def test_gradients_reach_router_budget_alpha_and_experts():
    torch.manual_seed(0)
    budget = Budget(2, E, 2.0)
    layers = [MoELayer(D, H, E, router="softmoe", learn_alpha=True, alpha=0.5, combine=c)
              for c in ("mask_softmax", "p")]
    x = torch.randn(2, 5, D)
    k_L = budget.k()
    h, aux = x, 0.0
    for layer, k_l in zip(layers, k_L):
        out = layer(h, mean_k=k_l)
        h, aux = h + out.output, aux + out.aux_loss
    (h.square().mean() + aux).backward()
    assert budget.theta.grad is not None and budget.theta.grad.abs().sum() > 0
    for layer in layers:
        for name, param in [("gate", layer.router.gate.weight), ("alpha", layer.router.log_alpha),
                            ("w_gate", layer.experts.w_gate), ("w_down", layer.experts.w_down)]:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


def test_standalone_learned_k_gets_gradient_and_penalty():
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, router="softmoe", k=2.0, learn_k=True)
    out = layer(torch.randn(2, 5, D))
    out.output.square().mean().backward()
    assert layer.router.own_k.theta.grad.abs() > 0
    assert out.stats["k"] == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("impl", ["padded", "grouped"])
def test_backward_from_broadcast_gradient(impl):
    # y.sum() sends a zero-stride gradient; the fast paths must still produce weight gradients.
    layer, _ = make_layer("softmoe_mask_softmax", impl)
    layer(torch.randn(2, 5, D)).output.sum().backward()
    assert layer.experts.w_up.grad.abs().sum() > 0


@pytest.mark.parametrize("router,k", [("topk", 1.0), ("softmoe", 1.0)])
def test_single_expert_equals_dense_swiglu(router, k):
    torch.manual_seed(0)
    layer = MoELayer(D, H, 1, router=router, k=k)
    dense = SwiGLU(D, H)
    with torch.no_grad():
        layer.experts.w_gate[0].copy_(dense.w_gate.weight.t())
        layer.experts.w_up[0].copy_(dense.w_up.weight.t())
        layer.experts.w_down[0].copy_(dense.w_down.weight.t())
    x = torch.randn(2, 5, D)
    out = layer(x)
    torch.testing.assert_close(out.output, dense(x), rtol=0, atol=1e-6)
    assert out.stats["active_experts_mean"] == 1.0


@pytest.mark.parametrize("router,k", [("topk", 2.0), ("softmoe", 2.0)])
def test_single_token_and_many_more_experts_than_tokens(router, k):
    torch.manual_seed(0)
    layer = MoELayer(D, H, 64, router=router, k=k)
    for x in (torch.randn(1, 1, D), torch.randn(1, 3, D)):
        y, _, stats, _ = layer(x)
        weight_TE = reference_weights(layer, x.reshape(-1, D), None)
        torch.testing.assert_close(y, ref.dense_moe(layer, x, weight_TE), rtol=0, atol=1e-5)
        assert int((stats["expert_load"] == 0).sum()) >= 64 - 2 * 3 * 4  # most experts are empty


def test_stats_are_detached_and_consistent():
    layer, _ = make_layer("softmoe_mask_softmax")
    _, aux, stats, logits = layer(torch.randn(3, 4, D))
    assert logits.shape == (12, E) and logits.dtype == torch.float32
    # a plain mapping of detached tensors (no attribute reads, no host sync): only the metrics writer makes floats
    assert type(stats) is dict and all(isinstance(t, torch.Tensor) for t in stats.values())
    assert stats["active_experts_mean"].dim() == 0 and stats["k"].dim() == 0
    hist = stats["active_experts_hist"]
    assert hist.shape == (E + 1,) and hist.sum() == 12 and hist[0] == 0
    mean_from_hist = float((hist * torch.arange(E + 1)).sum() / hist.sum())
    assert stats["active_experts_mean"] == pytest.approx(mean_from_hist)
    assert float(stats["expert_load"].sum()) == pytest.approx(1.0)
    assert all(not t.requires_grad for t in stats.values())
    assert aux.dim() == 0 and aux.requires_grad
    assert not hasattr(layer, "aux_loss") and not hasattr(layer, "stats")  # results are return values only


def test_bf16_autocast_close_to_fp32_and_padded_matches_loop():
    layer, _ = make_layer("softmoe_mask_softmax", "padded")
    loop, _ = make_layer("softmoe_mask_softmax", "loop")
    x = torch.randn(2, 8, D)
    y32 = layer(x).output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, y16_loop = layer(x).output, loop(x).output
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(y16.float(), y16_loop.float(), rtol=0.02, atol=0.02)


def test_bad_inputs_raise_clear_errors():
    layer, _ = make_layer("softmoe_mask_softmax")
    with pytest.raises(ValueError, match="d_model=16"):
        layer(torch.randn(2, 3, D + 1))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 3, D), attention_mask=torch.ones(3, 2, dtype=torch.bool))
    for value in (0.5, 2):  # a mask is bool or 0/1: anything else was silently read as True
        with pytest.raises(ValueError, match=f"attention_mask holds {value}"):
            layer(torch.randn(2, 3, D), attention_mask=torch.full((2, 3), value))
    layer(torch.randn(2, 3, D), attention_mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))  # 0/1 floats are fine
    with pytest.raises(ValueError, match="k must be a 0-d tensor"):
        layer(torch.randn(2, 3, D), mean_k=torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="k="):
        layer(torch.randn(2, 3, D), mean_k=torch.tensor(float(E)))
    with pytest.raises(ValueError, match="not finite"):
        layer(torch.full((1, 2, D), float("nan")))
    topk, _ = make_layer("mixtral_k2")
    with pytest.raises(ValueError, match="takes no budget k_l .uses_budget=False.; k must be None"):
        topk(torch.randn(1, 2, D), mean_k=torch.tensor(2.0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(router="dense"), "SwiGLU"),
    (dict(router="nope"), "registered routers"),
    (dict(router="topk", k=1.5), "k=1.5 must be an integer"),
    (dict(router="topk", k=9.0), "k=9.0"),
    (dict(router="softmoe", k=8.0), r"k=8.0 must be in \(0, num_experts=8\)"),
    (dict(router="softmoe", alpha=0.0), "alpha=0.0"),
    (dict(router="softmoe", min_weight=-0.1), "min_weight=-0.1"),
    (dict(router="softmoe", max_active=0), "max_active=0"),
    (dict(router="softmoe", combine="mean"), "combine='mean'"),
    (dict(router="softmoe", lb_coef=float("nan")), "lb_coef=nan"),
    (dict(router="softmoe", temperature=1.0), r"unknown option\(s\) \['temperature'\]"),
    (dict(router="topk", experts_impl="cuda"), "impl='cuda'"),
])
def test_bad_config_raises_naming_field(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MoELayer(D, H, E, **kwargs)


def test_after_step_moves_the_bias_and_remoe_lambda_in_a_users_own_loop():
    """softmoe.layers.after_step is the user's between-steps hook: without it the loss-free bias and ReMoE's
    lambda never move outside softmoe's trainer; with it they do, from the counts of every micro-batch."""
    from softmoe.layers import after_step

    torch.manual_seed(0)
    biased = MoELayer(16, 32, 4, router="topk", k=2.0, loss_free_bias=True)
    remoe = MoELayer(16, 32, 4, router="remoe", k=2.0)
    with torch.no_grad():  # a skewed gate: the bias has a load to even out
        biased.router.gate.weight[0] += 2.0
    x = torch.randn(2, 8, 16)
    micro = [(layer, layer(x).stats) for layer in (biased, remoe) for _ in range(2)]  # two micro-batches each
    lam = float(remoe.router.l1_coef)
    after_step(micro)
    assert biased.router.balance.bias_E.abs().sum() > 0 and float(remoe.router.l1_coef) != lam
    bias = biased.router.balance.bias_E.clone()
    biased.eval()
    after_step([(biased, biased(x).stats)])  # eval mode: nothing moves
    assert torch.equal(biased.router.balance.bias_E, bias)


def test_an_input_of_another_dtype_than_the_parameters_is_named():
    layer = MoELayer(16, 32, 4, router="softmoe", k=2.0)
    with pytest.raises(TypeError, match=r"x has dtype=torch.float64 but the layer's parameters are torch.float32"):
        layer(torch.randn(2, 3, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the layer: allowed
        assert layer(torch.randn(2, 3, 16, dtype=torch.bfloat16)).output.shape == (2, 3, 16)


def test_a_mean_k_that_is_not_a_0d_tensor_is_named():
    layer = MoELayer(16, 32, 4, router="softmoe", k=2.0)
    with pytest.raises(ValueError, match=r"mean_k must be a 0-d tensor .* got 1\.5"):
        layer(torch.randn(2, 3, 16), mean_k=1.5)


def test_an_empty_batch_routes_without_warnings():
    import warnings

    layer = MoELayer(16, 32, 4, router="softmoe", k=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer(torch.randn(0, 4, 16))
    assert out.output.shape == (0, 4, 16) and float(out.stats["logit_spread"]) == 0.0


def test_after_step_sums_a_layers_micro_batches_into_one_update():
    """Two micro-batches of one layer are one step: their counts are summed and the bias moves once. Opposite
    imbalances cancel (no move); equal ones move it by exactly one rate (not two)."""
    from softmoe.layers import after_step

    layer = MoELayer(16, 32, 4, router="topk", k=2.0, loss_free_bias=True)
    rate = layer.router.balance.rate

    def stats(counts):
        return {"expert_counts": torch.tensor(counts), "real_tokens": torch.tensor(4)}

    after_step([(layer, stats([0, 4, 2, 2])), (layer, stats([4, 0, 2, 2]))])  # summed: balanced
    assert torch.equal(layer.router.balance.bias_E, torch.zeros(4))
    after_step([(layer, stats([5, 1, 1, 1])), (layer, stats([5, 1, 1, 1]))])
    torch.testing.assert_close(layer.router.balance.bias_E, torch.tensor([-rate, rate, rate, rate]))


def test_after_step_takes_a_budgeted_layer_and_refuses_unmeasured_stats():
    import softmoe
    from softmoe.layers import after_step

    budget = softmoe.SoftMoEBudget(num_layers=1, num_experts=4, budget=2.0)
    wrapped = budget.attach(MoELayer(16, 32, 4, router="softmoe", k=2.0, loss_free_bias=True))
    x = torch.randn(2, 3, 16)
    after_step([(wrapped, wrapped.moe(x, mean_k=budget()[0]).stats)])  # the wrapper stands for its layer
    with pytest.raises(ValueError, match="measure=False"):
        after_step([(wrapped.moe, wrapped.moe(x, mean_k=budget()[0], measure=False).stats)])
