"""Generation: greedy == argmax over full forwards, nucleus filtering, reproducible sampling, bad args.

Run: .venv/bin/python -m pytest -q tests/unit/model/test_generate.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.model import GPT, ModelConfig, generate, sample_next


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, num_experts=4, d_expert=16, k=1.5,
                         max_seq_len=32)
    return GPT(config).eval()


def test_greedy_matches_uncached_argmax(model):
    prompt = torch.randint(0, 50, (2, 5))
    out = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(model):
    prompt = torch.randint(0, 50, (1, 4))
    a = generate(model, prompt, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy = generate(model, prompt, 10, temperature=0.0)
    nucleus_of_one = generate(model, prompt, 10, temperature=1.0, top_p=1e-6, generator=torch.Generator())
    assert torch.equal(greedy, nucleus_of_one)


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.8, gen).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are never drawn


def test_eos_stops_early(model):
    prompt = torch.randint(0, 50, (1, 3))
    first = generate(model, prompt, 1, temperature=0.0)[0, -1].item()
    out = generate(model, prompt, 10, temperature=0.0, eos_id=first)
    assert out.shape == (1, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(max_new_tokens=-2), "max_new_tokens=-2"),
        (dict(max_new_tokens=40), "exceeds max_seq_len=32"),
    ],
)
def test_bad_arguments_raise(model, kwargs, match):
    args = dict(max_new_tokens=4, temperature=1.0, top_p=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature="hot"), "temperature must be a float, got str 'hot'"),
        (dict(top_p=True), "top_p must be a float, got bool True"),
        (dict(max_new_tokens=4.0), "max_new_tokens=4.0 must be an int >= 0"),
    ],
)
def test_arguments_of_the_wrong_type_raise_type_error(model, kwargs, match):
    args = dict(max_new_tokens=4, temperature=1.0, top_p=1.0) | kwargs
    with pytest.raises(TypeError, match=match):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)
