"""The GPT decoder: shapes, tied head, budget ownership, KV-cache decoding == full forward.

Run: .venv/bin/python -m pytest -q tests/unit/model/test_decoder.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.model import GPT, ModelConfig

VARIANTS = {
    "dense": dict(ffn="dense"),
    "topk": dict(ffn="moe", router="topk", k=2.0),
    "softmoe": dict(ffn="moe", router="softmoe", k=2.0),
    "softmoe_every2": dict(ffn="moe", router="softmoe", k=1.5, moe_every=2),
}


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_ff=64, num_experts=4, d_expert=16,
                max_seq_len=48)
    return ModelConfig(**{**base, **overrides})


def make_model(variant: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**VARIANTS[variant])).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_shapes_loss_and_aux(variant):
    model = make_model(variant)
    idx = torch.randint(0, 97, (2, 12))
    out = model(idx, idx)
    assert out.logits.shape == (2, 12, 97) and out.logits.dtype == torch.float32
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)
    assert list(out.routing) == model.config.moe_layers
    for stats in out.routing.values():
        assert stats["active_experts_mean"] >= 1.0
    assert out.objective.item() == pytest.approx(out.loss.item() + out.aux_loss.item())


def test_head_is_tied_to_embedding():
    model = make_model("dense")
    names = set(model.state_dict())
    assert "embed.weight" in names and not any("lm_head" in n for n in names)
    idx = torch.randint(0, 97, (1, 5))
    out = model(idx, idx)
    out.loss.backward()
    assert model.embed.weight.grad is not None


def test_model_owns_one_budget_and_its_k_reaches_the_layers():
    model = make_model("softmoe_every2")
    assert model.budget is not None and model.budget.num_layers == len(model.config.moe_layers) == 1
    assert make_model("topk").budget is None and make_model("dense").budget is None
    softmoe = make_model("softmoe").train()
    out = softmoe(torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10)))
    k_L = torch.stack([stats["k"] for stats in out.routing.values()])  # the one report of each layer's k
    assert k_L.shape == (3,) and torch.equal(k_L, softmoe.budget().detach())
    assert k_L.mean().item() == pytest.approx(2.0, abs=1e-5)
    assert not hasattr(out, "k_L")
    out.objective.backward()
    assert softmoe.budget.theta.grad is not None and torch.isfinite(softmoe.budget.theta.grad).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_matches_full_forward(variant):
    model = make_model(variant)
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx).logits
    cache = model.new_cache(batch_size=2)
    # A prefill, a multi-token chunk after the cache (explicit mask), then one token at a time.
    pieces = [model(idx[:, :7], cache=cache).logits, model(idx[:, 7:11], cache=cache).logits]
    pieces += [model(idx[:, t:t + 1], cache=cache).logits for t in range(11, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_last_only_matches_last_position():
    model = make_model("softmoe")
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(idx, last_only=True).logits[:, 0], model(idx).logits[:, -1])


def test_bad_inputs_raise():
    model = make_model("dense")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="last_only"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), last_only=True)
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(1, max_len=49)
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="overflow|max_seq_len"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_bf16_autocast_keeps_budget_and_loss_in_fp32():
    model = make_model("softmoe").train()
    idx = torch.randint(0, 97, (2, 10))
    reference = model(idx, idx)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(idx, idx)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    for block, stats in out.routing.items():
        assert stats["k"].dtype == torch.float32 and torch.equal(stats["k"], reference.routing[block]["k"])
    assert abs(out.loss.item() - reference.loss.item()) < 0.05
    out.objective.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
