"""Activation checkpointing (GPT(activation_checkpointing=True), train.activation_checkpointing) gives the plain
forward's loss, aux loss, routing stats and gradients: results are return values, so recomputing a block in
backward counts nothing twice.

Run: .venv/bin/python -m pytest -q tests/unit/model/test_activation_checkpointing.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.model import GPT, ModelConfig
from softmoe.train.config import ParallelConfig, RunConfig, TrainConfig

VARIANTS = {
    # gate noise draws random numbers in forward: the recomputation must replay the same ones.
    "softmoe_noisy_gate": dict(router="softmoe", k=2.0, router_options={"gate_noise": 0.5}),
    "softmoe_penalty_budget": dict(router="softmoe", k=1.5, moe_every=2,
                                   budget_options={"mode": "penalty", "penalty_coef": 0.5}),
    "topk_shared_fine": dict(router="topk", k=2.0, num_shared_experts=1, granularity=2),
}


def make_model(variant: str, checkpointing: bool) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=64, num_experts=4, d_expert=16,
                         max_seq_len=16, **VARIANTS[variant])
    return GPT(config, activation_checkpointing=checkpointing).train()


def step(model: GPT, padded: bool):
    """One forward + backward; (output, {name: grad}, block forward calls)."""
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.bool)
    if padded:
        mask[1, :3] = False  # left padding
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in model.blocks]
    torch.manual_seed(2)  # the gate noise
    out = model(idx, torch.roll(idx, -1, 1), attention_mask=mask if padded else None)
    out.objective.backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads, len(calls)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_loss_aux_stats_and_gradients(variant, padded):
    plain_out, plain_grads, plain_calls = step(make_model(variant, False), padded)
    ckpt_out, ckpt_grads, ckpt_calls = step(make_model(variant, True), padded)
    assert ckpt_calls == 2 * plain_calls == 6  # every block really ran again in backward
    assert torch.equal(ckpt_out.loss, plain_out.loss)
    assert torch.equal(ckpt_out.aux_loss, plain_out.aux_loss) and float(plain_out.aux_loss.detach()) > 0
    assert list(ckpt_out.routing) == list(plain_out.routing)
    for block, stats in plain_out.routing.items():
        for name, value in stats.items():
            assert torch.equal(ckpt_out.routing[block][name], value), (block, name)
    assert ckpt_grads.keys() == plain_grads.keys()
    assert any("budget" in name for name in plain_grads) == variant.startswith("softmoe")
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_off_without_grad_and_with_a_cache():
    model = make_model("topk_shared_fine", True).eval()
    calls = []
    for b in model.blocks:
        b.register_forward_pre_hook(lambda *_: calls.append(1))
    idx = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        want = model(idx).logits
    cache = model.new_cache(1)
    got = model(idx, cache=cache).logits  # with grad enabled, but a cache: no checkpoint (it would write twice)
    torch.testing.assert_close(got, want)
    assert cache.length == 5


def test_train_option_reaches_the_model_and_is_validated():
    assert TrainConfig().activation_checkpointing is False
    with pytest.raises(TypeError, match="train.activation_checkpointing must be a bool"):
        TrainConfig(activation_checkpointing="yes")
    with pytest.raises(ValueError, match="needs parallel.data=none .got parallel.data='ddp'"):
        RunConfig(train=TrainConfig(activation_checkpointing=True), parallel=ParallelConfig(data="ddp"))
    with pytest.raises(TypeError, match="activation_checkpointing must be a bool"):
        GPT(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=8), activation_checkpointing=1)


@pytest.mark.parametrize("router,options", [("remoe", {}), ("topk", {"loss_free_bias": True}),
                                            ("softmoe", {"loss_free_bias": True})])
def test_controller_counts_and_updates_are_the_same_with_and_without_recomputation(router, options):
    """The controllers read the step's counts from the first forward's return values; the recomputation in backward
    counts nothing, so the counts and the state they move (ReMoE's lambda, the loss-free bias) are identical."""
    from softmoe.routing.diagnostics import RoutingCounts
    from softmoe.train import controllers

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, num_experts=4, d_expert=16,
                             max_seq_len=16, router=router, k=2.0, router_options=options)
        model = GPT(config, activation_checkpointing=checkpointing).train()
        idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        out = model(idx, torch.roll(idx, -1, 1))
        out.objective.backward()
        counts = RoutingCounts()
        counts.add(out.routing)
        controllers.step(model, counts)
        state = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("l1_coef", "bias_E"))}
        results.append(([c["expert_counts"].clone() for c in counts.layers], state))
    (plain_counts, plain_state), (recomputed_counts, recomputed_state) = results
    assert all(torch.equal(a, b) and float(a.sum()) > 0 for a, b in zip(plain_counts, recomputed_counts))
    assert plain_state.keys() == recomputed_state.keys() and plain_state
    assert all(torch.equal(plain_state[k], recomputed_state[k]) for k in plain_state)
