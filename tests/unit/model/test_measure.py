"""Decoding without measuring: GPT.forward(measure=False) gives the measured forward's logits, with aux loss 0 and
no routing statistics, and `generate` (ours and transformers') decodes that way; measured decoding gives the
same tokens. Also: a config copied to another router keeps the options it set (dataclasses.replace)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from softmoe.model import GPT, ModelConfig, generate

TINY = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, d_expert=16,
                   router="softmoe", k=2.0, max_seq_len=32)


@torch.no_grad()
def _greedy_measured(model: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n)
    out, step = prompt, prompt
    for _ in range(n):
        logits = model(step, cache=cache, last_only=True).logits[:, -1]  # measure=True: the default
        step = logits.argmax(dim=-1, keepdim=True)
        out = torch.cat([out, step], dim=1)
    return out


@pytest.mark.parametrize("router", ["softmoe", "topk"])
def test_unmeasured_forward_and_generate_match_the_measured_ones(router):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(TINY, router=router)).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        measured, bare = model(ids), model(ids, measure=False)
    assert torch.equal(bare.logits, measured.logits) and float(bare.aux_loss) == 0.0
    assert set(bare.routing) == set(measured.routing) and all(s == {} for s in bare.routing.values())
    assert all("active_experts_mean" in s for s in measured.routing.values())
    assert torch.equal(generate(model, ids, 8, temperature=0.0), _greedy_measured(model, ids, 8))


def test_unmeasured_forward_is_refused_with_gradients():
    model = GPT(TINY).train()
    with pytest.raises(ValueError, match="measure=False skips the aux losses"):
        model(torch.randint(0, 50, (1, 4)), measure=False)


def test_transformers_generation_steps_are_unmeasured():
    from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM

    hf = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(TINY)).eval()
    ids = torch.randint(0, 50, (1, 5))
    inputs = hf.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids), use_cache=True)
    assert inputs["measure"] is False
    with torch.no_grad():
        assert torch.equal(hf(ids, measure=False).logits, hf(ids).logits)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                      do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_measured(hf.model, ids, 6))


def test_a_precomputed_layer_k_routes_as_the_budget_does():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        model.budget.theta.copy_(torch.tensor([0.7, -0.7]))  # unequal k_l, so a wrong layer would show
        ids = torch.randint(0, 50, (2, 7))
        given = model(ids, layer_k=model.layer_k(), measure=False).logits
        assert torch.equal(given, model(ids).logits)
        swapped = model(ids, layer_k=model.layer_k().flip(0), measure=False).logits
        assert not torch.equal(swapped, given)  # the argument is what routes


def test_a_precomputed_layer_k_is_refused_where_it_cannot_serve():
    ids = torch.randint(0, 50, (1, 4))
    model = GPT(TINY)
    with pytest.raises(ValueError, match="layer_k precomputes the budget for inference"):
        model(ids, layer_k=model.layer_k().detach())
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"layer_k must be a \(2,\) tensor"):
            model(ids, layer_k=torch.ones(3))
        with pytest.raises(ValueError, match="takes no budget"):
            GPT(dataclasses.replace(TINY, router="topk"))(ids, layer_k=torch.ones(2))


def test_transformers_beam_search_and_several_sequences_with_a_budget():
    # generate hands the precomputed k_l to every step without repeating them along the batch.
    from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM

    torch.manual_seed(0)
    hf = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(TINY)).eval()
    ids = torch.randint(0, 50, (2, 5))
    beams = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, num_beams=3,
                        num_return_sequences=2, do_sample=False, pad_token_id=0)
    assert beams.shape[0] == 4 and torch.equal(beams[:, :5], ids.repeat_interleave(2, dim=0))
    given = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, num_beams=3,
                        num_return_sequences=2, do_sample=False, pad_token_id=0, layer_k=hf.model.layer_k().detach())
    assert torch.equal(given, beams)
    greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, generate(hf.model, ids, 4, temperature=0.0))


@pytest.mark.parametrize("assistant", ["softmoe-1-layer", "softmoe-2-layers", "topk"])
def test_transformers_assisted_decoding_with_a_budget(assistant):
    # An assistant model gets its own k_l (or none): transformers hands it a copy of the main model's kwargs.
    from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM

    torch.manual_seed(0)
    main = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(TINY)).eval()
    with torch.no_grad():
        main.model.budget.theta.copy_(torch.tensor([0.7, -0.7]))
    small = {"softmoe-1-layer": dataclasses.replace(TINY, n_layers=1), "softmoe-2-layers": TINY,
             "topk": dataclasses.replace(TINY, router="topk")}[assistant]
    helper = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(small)).eval()
    ids = torch.randint(0, 50, (1, 5))
    greedy = generate(main.model, ids, 6, temperature=0.0)
    for given in ({}, {"layer_k": main.model.layer_k().detach()}):  # computed by generate, or given
        out = main.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                            do_sample=False, pad_token_id=0, assistant_model=helper, **given)
        assert torch.equal(out, greedy)  # greedy: assisting changes nothing


def test_replacing_the_router_keeps_the_options_set():
    noisy = dataclasses.replace(TINY, router_options={"gate_noise": 0.1})
    topk = dataclasses.replace(noisy, router="topk", k=2.0)
    assert topk.router_options.gate_noise == 0.1 and type(topk.router_options).__name__ == "TopKOptions"
    with pytest.raises(ValueError, match="alpha"):
        dataclasses.replace(dataclasses.replace(TINY, router_options={"alpha": 0.5}), router="topk", k=2.0)
