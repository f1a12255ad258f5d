"""ExpertChoiceRouter (Zhou et al. 2022): equals the naive loop oracle (experts pick their top tokens);
capacity respected per group; padding never picked; NOT batch invariant (non-causal) and flagged so:
the model refuses KV-cache decoding with it; config errors.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_expert_choice_router.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from softmoe.layers import MoELayer
from softmoe.model import GPT, ModelConfig
from softmoe.routing import ROUTERS, ExpertChoiceConfig, build_router
from softmoe.routing.expert_choice import expert_capacity
from tests.reference import dense_moe as ref
from tests.reference.invariance import assert_batch_and_decoding_invariant

D, H, E = 16, 32, 8

# name -> (k, layer options)
CASES = {
    "k2": (2.0, dict()),
    "k1_cf2": (1.0, dict(capacity_factor=2.0)),
    "k3_groups5": (3.0, dict(group_size=5)),
    "k0.5_cf1.5_groups4": (0.5, dict(capacity_factor=1.5, group_size=4)),
}


def make_layer(case: str, impl: str = "padded", seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    k, options = CASES[case]
    return MoELayer(D, H, E, router="expert_choice", k=k, experts_impl=impl, **options)


@pytest.mark.parametrize("impl", ["padded", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_equals_naive_loop_reference(case, impl):
    layer = make_layer(case, impl)
    x = torch.randn(3, 7, D)
    weight_TE = ref.expert_choice_weights(layer, x.reshape(-1, D))
    routed = layer.router(x.reshape(-1, D)).routing
    torch.testing.assert_close(routed.dense_weights(), weight_TE, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x).output, ref.dense_moe(layer, x, weight_TE), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_capacity_is_respected_per_group_and_expert(case):
    layer = make_layer(case)
    cfg = layer.router.config
    num_tokens = 21
    keep_TE = layer.router(torch.randn(num_tokens, D)).routing.dense_weights() > 0
    size = cfg.group_size or num_tokens
    for start in range(0, num_tokens, size):
        group = keep_TE[start:start + size]
        capacity = min(len(group), max(1, int(cfg.capacity_factor * len(group) * cfg.k / E + 0.5)))
        assert group.sum(dim=0).tolist() == [capacity] * E  # every expert exactly full: perfect balance


def test_capacity_rounding_is_half_up_clamped_to_one_and_group():
    real_G = torch.tensor([0, 1, 2, 3, 10, 100])
    # cf * T * k / E with k=2, E=8: 0, .25, .5, .75, 2.5, 25 -> clamp(round half up, 1, T)
    assert expert_capacity(real_G, 2.0, 8, 1.0).tolist() == [0, 1, 1, 1, 3, 25]
    assert expert_capacity(torch.tensor([4]), 8.0, 8, 3.0).tolist() == [4]  # at most every token


def test_padding_is_never_picked_and_does_not_count_towards_capacity():
    layer = make_layer("k2")
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 1, 1]]).bool()
    x_nan = torch.where(mask.unsqueeze(-1), x, float("nan"))
    y = layer(x_nan, attention_mask=mask).output
    routed = layer.router(x_nan.reshape(-1, D), mask_T=mask.reshape(-1)).routing
    assert not bool((~mask.reshape(-1))[routed.token_N].any())  # no padding token routed
    assert torch.equal(y[~mask], torch.zeros(int((~mask).sum()), D))
    # 7 real tokens: C = round(7 * 2 / 8) = 2 per expert, as if the padding were absent
    assert routed.counts_E.tolist() == [2] * E
    torch.testing.assert_close(y[mask], layer(x[mask].reshape(1, -1, D)).output[0], rtol=0, atol=1e-6)
    weight_TE = ref.expert_choice_weights(layer, x.reshape(-1, D), mask.reshape(-1))
    torch.testing.assert_close(routed.dense_weights(), weight_TE, rtol=0, atol=1e-6)


def test_a_token_may_get_zero_or_many_experts():
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, router="expert_choice", k=1.0)
    with torch.no_grad():
        layer.router.gate.weight.mul_(5.0)  # peaked scores: experts agree on some tokens, skip others
    out = layer.router(torch.randn(64, D))
    active_T = out.routing.active_per_token()
    assert int(active_T.min()) == 0 and int(active_T.max()) >= 3
    assert out.stats["zero_expert_fraction"] == pytest.approx(float((active_T == 0).float().mean()))
    assert out.stats["active_experts_mean"] == pytest.approx(1.0)  # E * C / T = 8 * 8 / 64


def test_not_batch_invariant_a_tokens_output_depends_on_its_group():
    layer = make_layer("k2")
    with pytest.raises(AssertionError):  # the shared invariance check must FAIL for expert choice
        assert_batch_and_decoding_invariant(layer, D)
    # Direct check: same token, other tokens of the group replaced -> its output changes.
    x = torch.randn(1, 12, D)
    changed = x.clone()
    changed[0, 1:] = torch.randn(11, D) * 3
    moved = [not torch.allclose(layer(x).output[0, 0], layer(torch.cat([x[:, :1], other[:, 1:]], 1)).output[0, 0])
             for other in (changed, torch.randn(1, 12, D) * 3, torch.randn(1, 12, D) * 3)]
    assert any(moved)


def test_groups_are_independent_of_each_other():
    layer = make_layer("k3_groups5")
    x = torch.randn(1, 10, D)
    other = torch.cat([x[:, :5], torch.randn(1, 5, D) * 3], dim=1)  # second group replaced
    torch.testing.assert_close(layer(other).output[0, :5], layer(x).output[0, :5], rtol=0, atol=1e-6)


def test_flagged_non_causal_and_model_refuses_cached_decoding():
    assert ROUTERS["expert_choice"][1].causal is False
    assert all(ROUTERS[name][1].causal for name in ROUTERS if name != "expert_choice")
    assert make_layer("k2").causal is False
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, num_experts=4, d_expert=8,
                         router="expert_choice", k=1.0, max_seq_len=8)
    model = GPT(config)
    assert model.causal is False
    model(torch.randint(0, 32, (2, 8)))  # a full forward (training, scoring) runs
    with pytest.raises(ValueError, match="'expert_choice' is not causal"):
        model.new_cache(1)
    causal_model = GPT(dataclasses.replace(config, router="topk"))
    assert causal_model.causal is True
    with pytest.raises(ValueError, match="not causal"):
        model(torch.randint(0, 32, (1, 1)), cache=causal_model.new_cache(1))


def test_registered_and_nominal_count():
    assert ROUTERS["expert_choice"][0] is ExpertChoiceConfig
    router = build_router("expert_choice", D, E, 2.0, capacity_factor=1.5)
    assert router.uses_budget is False and router.config.group_size is None
    assert router.config.nominal_active_experts() == pytest.approx(3.0)
    assert router(torch.randn(16, D)).stats["k"] == pytest.approx(3.0)  # the nominal count, capacity_factor * k


@pytest.mark.parametrize("options,error,match", [
    (dict(capacity_factor=0.0), ValueError, r"capacity_factor=0.0"),
    (dict(capacity_factor="1"), TypeError, r"capacity_factor must be a float"),
    (dict(group_size=0), ValueError, r"group_size=0 must be None or an int >= 1"),
    (dict(group_size=2.5), TypeError, r"group_size=2.5"),
])
def test_bad_config_raises_naming_field(options, error, match):
    options = dict(options)
    k = options.pop("k", 2.0)
    with pytest.raises(error, match=match):
        build_router("expert_choice", D, E, k, **options)
