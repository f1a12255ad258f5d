"""`router: softmoe` with no options is the paper's rule (docs/method.md): LapSum soft top-k on raw fp32
logits with alpha 1, the relative clamped truncation threshold, raw kept p as combine weights, training-only
gate noise. Checked against a slow loop reference written from the method notes (docs/method.md;
tests/reference/paper_rule.py).

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_softk_paper_rule.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softmoe.layers import MoELayer
from softmoe.ops import soft_topk
from softmoe.routing import build_router
from softmoe.routing.softk import SoftKConfig, relative_keep
from tests.reference.invariance import assert_batch_and_decoding_invariant, assert_padding_ignored
from tests.reference.paper_rule import paper_rule_weights


def test_defaults_are_the_papers():
    cfg = SoftKConfig(num_experts=32, k=1.5)
    assert (cfg.alpha, cfg.truncation, cfg.threshold, cfg.cap_factor, cfg.combine, cfg.gate_noise) == (
        1.0, "relative", 1.8, 2.0, "raw_p", 0.0)


@pytest.mark.parametrize("num_experts, k", [(8, 2.0), (8, 1.5), (16, 1.0), (32, 1.5), (32, 3.3), (4, 2.5)])
def test_router_matches_the_loop_reference(num_experts, k):
    torch.manual_seed(num_experts + int(10 * k))
    router = build_router("softmoe", 12, num_experts, k).eval()
    x = torch.randn(40, 12) * 3
    out = router(x)
    logits = x @ router.gate.weight.t()
    expected = paper_rule_weights(logits.double(), k)
    torch.testing.assert_close(out.routing.dense_weights().double(), expected, rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_experts=st.integers(2, 40), k_frac=st.floats(0.02, 0.98), scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
       ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_properties_of_the_truncation(num_experts, k_frac, scale, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    k = max(1e-3, k_frac * num_experts)
    logits = torch.randn(16, num_experts, generator=gen) * scale
    if ties:
        logits = logits.round()
    p = soft_topk(logits, k)
    keep = relative_keep(p, torch.tensor(k), 1.8, 2.0)
    active = keep.sum(-1)
    m = min(math.ceil(k * 2.0), num_experts)
    assert (active >= 1).all()
    # More than m only through ties at tau: every extra kept expert ties the m-th largest p.
    p_desc = p.sort(-1, descending=True).values
    over = active > m
    if m < num_experts:
        assert torch.equal(p_desc[over, m], p_desc[over, m - 1])
    else:
        assert not over.any()
    assert ((p * keep).sum(-1) <= k + 1e-5).all()
    assert keep.gather(-1, p.argmax(-1, keepdim=True)).all()  # the top expert is always kept


@given(num_experts=st.integers(16, 40), k_frac=st.floats(0.1, 0.2), ratio=st.floats(1.05, 1.6),
       seed=st.integers(0, 2**31 - 1))
@settings(deadline=None, max_examples=60)
def test_the_kept_set_ignores_k_while_every_p_is_below_one_half(num_experts, k_frac, ratio, seed):
    """Why the budget dial rescales weights instead of counts (benchmarks/dial_diagnosis.py): where every p_i of a
    token stays below 1/2, LapSum's p_i = e^(r_i/alpha - b) / 2, so a larger k only lowers b and multiplies all
    p_i by k'/k, like the threshold 1.8 k / E; unless the lower clamp (the m-th largest p, m = ceil(k c))
    binds, the kept set is the same and only the kept weights scale."""
    gen = torch.Generator().manual_seed(seed)
    k, k2 = k_frac * num_experts / ratio, k_frac * num_experts  # mean p at the larger k: k_frac
    logits = torch.randn(64, num_experts, generator=gen, dtype=torch.float64) * 0.5
    p1, p2 = soft_topk(logits, k), soft_topk(logits, k2)
    tail = (p1.amax(-1) < 0.5) & (p2.amax(-1) < 0.5)
    torch.testing.assert_close(p2[tail], p1[tail] * ratio, rtol=1e-9, atol=0)
    keep1 = relative_keep(p1, torch.tensor(k), 1.8, 2.0)
    keep2 = relative_keep(p2, torch.tensor(k2), 1.8, 2.0)
    base1 = 1.8 * k / num_experts
    m1, m2 = (min(math.ceil(v * 2.0), num_experts) for v in (k, k2))
    desc1, desc2 = p1.sort(-1, descending=True).values, p2.sort(-1, descending=True).values
    no_lower_clamp = (base1 >= desc1[:, m1 - 1]) & (1.8 * k2 / num_experts >= desc2[:, m2 - 1])
    clear_of_tau = ((p1 - base1).abs() > 1e-9).all(-1)  # no p on the threshold, where rounding could decide
    same = tail & no_lower_clamp & clear_of_tau
    assert same.float().mean() > 0.2  # the case the test is about is common at these scales, not vacuous
    assert torch.equal(keep1[same], keep2[same])
    torch.testing.assert_close((p2 * keep2).sum(-1)[same], (p1 * keep1).sum(-1)[same] * ratio, rtol=1e-9, atol=0)


def test_every_token_keeps_between_1_and_m_at_the_papers_scale():
    router = build_router("softmoe", 32, 32, 1.5).eval()
    active = router(torch.randn(512, 32) * 4).routing.active_per_token()
    assert active.min() >= 1 and active.max() <= 3
    assert 1.0 < active.float().mean() < 3.0  # variable


def test_gradient_reaches_logits_and_k_through_kept_p_only():
    torch.manual_seed(1)
    router = build_router("softmoe", 10, 8, 2.0)
    x = torch.randn(30, 10)
    k = torch.tensor(2.0, requires_grad=True)
    out = router(x, k=k)
    c = torch.randn(30, 8)
    (out.routing.dense_weights() * c).sum().backward()
    grad_gate, grad_k = router.gate.weight.grad.clone(), k.grad.clone()

    # The same through an explicit formula: soft_topk with the (constant) kept mask.
    w = router.gate.weight.detach().clone().requires_grad_()
    k2 = torch.tensor(2.0, requires_grad=True)
    p = soft_topk(x @ w.t(), k2, 1.0)
    keep = out.routing.dense_weights() > 0
    (p * keep * c).sum().backward()
    torch.testing.assert_close(grad_gate, w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, k2.grad, rtol=1e-5, atol=1e-6)
    assert grad_k.abs() > 0


def test_gate_noise_is_training_only_and_drawn_from_the_torch_rng():
    torch.manual_seed(0)
    router = build_router("softmoe", 10, 8, 2.0, gate_noise=0.5)
    quiet = build_router("softmoe", 10, 8, 2.0)
    quiet.load_state_dict(router.state_dict())
    x = torch.randn(64, 10)
    router.eval()
    torch.testing.assert_close(router(x).routing.dense_weights(), quiet.eval()(x).routing.dense_weights())
    router.train()
    torch.manual_seed(5)
    a = router(x).routing.dense_weights()
    torch.manual_seed(5)
    b = router(x).routing.dense_weights()
    assert torch.equal(a, b)  # same RNG state, same noise
    assert not torch.equal(a, quiet.train()(x).routing.dense_weights())


@pytest.mark.parametrize("router, k", [("topk", 2.0), ("topk", 1.0), ("topp", 2.0), ("remoe", 2.0)])
def test_every_router_takes_the_gate_noise_in_training_only(router, k):
    """The template applies gate_noise for every router: top-k baselines get the paper's noise too."""
    torch.manual_seed(0)
    noisy = build_router(router, 10, 8, k, gate_noise=2.0)
    quiet = build_router(router, 10, 8, k)
    quiet.load_state_dict(noisy.state_dict())
    x = torch.randn(256, 10)
    torch.testing.assert_close(noisy.eval()(x).routing.dense_weights(), quiet.eval()(x).routing.dense_weights())
    trained = noisy.train()(x)
    assert not torch.equal(trained.routing.dense_weights(), quiet.train()(x).routing.dense_weights())
    torch.testing.assert_close(trained.logits_TE, quiet(x).logits_TE)  # the losses read the clean logits


def test_raw_p_norm_keeps_the_paper_set_and_renormalises_its_p():
    torch.manual_seed(0)
    x = torch.randn(40, 10)
    raw = build_router("softmoe", 10, 8, 1.5).eval()
    norm = build_router("softmoe", 10, 8, 1.5, combine="raw_p_norm").eval()
    norm.load_state_dict(raw.state_dict())
    w_raw, w_norm = raw(x).routing.dense_weights(), norm(x).routing.dense_weights()
    assert torch.equal(w_raw > 0, w_norm > 0)
    torch.testing.assert_close(w_norm, w_raw / w_raw.sum(-1, keepdim=True))
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(40))


def test_layer_invariant_to_batch_padding_and_decoding_with_noise_configured():
    torch.manual_seed(0)
    layer = MoELayer(12, 24, 8, router="softmoe", k=1.5, gate_noise=0.3).eval()
    assert_batch_and_decoding_invariant(layer, 12)
    assert_padding_ignored(layer, 12, ("active_experts_mean", "load_balance_loss", "z_loss"))


def test_earlier_rule_reachable_by_options():
    torch.manual_seed(0)
    router = build_router("softmoe", 10, 8, 2.0, alpha=0.1, truncation="min_weight", min_weight=0.05,
                          combine="mask_softmax").eval()
    x = torch.randn(20, 10)
    out = router(x)
    logits = x @ router.gate.weight.t()
    p = soft_topk(logits, 2.0, 0.1)
    keep = p >= 0.05
    keep.scatter_(-1, p.argmax(-1, keepdim=True), True)
    w = torch.where(keep, p * torch.softmax(logits, -1), 0.0)
    torch.testing.assert_close(out.routing.dense_weights(), w / w.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, match", [
    ({"truncation": "hard"}, "truncation='hard' must be one of"),
    ({"threshold": -1.0}, "threshold=-1.0"),
    ({"cap_factor": 0.0}, "cap_factor=0.0"),
    ({"alpha": 1e-40}, "alpha=1e-40"),
    ({"gate_noise": -0.1}, "gate_noise=-0.1"),
    ({"combine": "softmax"}, "combine='softmax' must be one of"),
])
def test_bad_options_name_the_field(options, match):
    with pytest.raises(ValueError, match=match):
        build_router("softmoe", 10, 8, 2.0, **options)


def test_balance_loss_is_the_papers_realized_count_form():
    """Switch loss from softmax(logits) and the truncated routing's per-expert counts, normalised by the
    realized mean active experts (not the nominal k), padding excluded."""
    torch.manual_seed(3)
    router = build_router("softmoe", 10, 8, 1.5, lb_coef=1.0, z_coef=0.0).eval()
    x = torch.randn(50, 10) * 3
    mask = torch.ones(50, dtype=torch.bool)
    mask[40:] = False
    out = router(x, mask_T=mask)
    keep = out.routing.dense_weights()[:40] > 0
    realized_ae = keep.sum(-1).float().mean()
    f_e = keep.sum(0).float() / (40 * realized_ae)
    p_e = torch.softmax(x[:40] @ router.gate.weight.t(), -1).mean(0)
    assert realized_ae != 1.5
    torch.testing.assert_close(out.aux_loss, 8 * (f_e * p_e).sum(), rtol=1e-5, atol=1e-6)
