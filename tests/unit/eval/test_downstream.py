"""Zero-shot scorer: exact log-likelihoods and acc / acc_norm / acc_bytes on hand-made tasks whose answers
are known by construction (a stub model with controlled logits), windows, padding, routing, validation.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_downstream.py
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from softmoe.eval.downstream import bootstrap_ci, encode_pair, evaluate_items, evaluate_tasks, score_requests
from softmoe.eval.tasks import Item
from softmoe.model import GPT, ModelConfig

V = 256  # the stub vocabulary: one token per character code < 256


class CharTokenizer:
    """One token per character (code point < 256), so token counts are known by eye."""

    def encode(self, text: str):
        assert all(ord(c) < V for c in text)
        return SimpleNamespace(ids=[ord(c) for c in text])


class BigramStub(nn.Module):
    """logits[b, s] = table[idx[b, s]]: the next-token distribution depends on the current token only.

    Records the longest forward, so tests can check that windows never exceed max_seq_len.
    """

    def __init__(self, table_VV: torch.Tensor, max_seq_len: int = 64):
        super().__init__()
        self.register_buffer("table", table_VV.float())
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.longest = 0

    def forward(self, idx_BS: torch.Tensor):
        assert idx_BS.shape[1] <= self.config.max_seq_len
        self.longest = max(self.longest, idx_BS.shape[1])
        return SimpleNamespace(logits=self.table[idx_BS], routing={})


def mc(context: str, answers: list[str], gold: int) -> Item:
    return Item(tuple((context, " " + a) for a in answers), gold, tuple(answers))


C = math.log(V)  # -log p of every token under uniform logits


def test_scores_are_exact_sums_of_token_logprobs():
    model, tok = BigramStub(torch.zeros(V, V)), CharTokenizer()
    scores = score_requests(model, tok, [("Q", " ab"), ("Q", " abcdef"), ("Q:", " éé")], batch_size=2)
    assert [s.tokens for s in scores] == [3, 7, 3]
    for score in scores:
        assert score.loglik == pytest.approx(-score.tokens * C, abs=1e-5)


def test_acc_acc_norm_acc_bytes_on_a_three_item_task():
    # Uniform logits: every token costs log V, a continuation " x" of n characters costs (n + 1) log V.
    # acc prefers the fewest tokens, acc_norm divides by characters (prefers the longest answer) and
    # acc_bytes by UTF-8 bytes ("éé" is 2 characters but 4 bytes).
    items = [
        mc("Q", ["ab", "abcdef"], gold=0),  # acc 1, acc_norm 0, acc_bytes 0
        mc("Q", ["ab", "abcdef"], gold=1),  # acc 0, acc_norm 1, acc_bytes 1
        mc("Q", ["éé", "abc"], gold=0),  # sums -3C vs -4C: acc 1; /chars -1.5C vs -1.33C: 0; /bytes -0.75C: 1
    ]
    result = evaluate_items(BigramStub(torch.zeros(V, V)), CharTokenizer(), "hand", items, batch_size=4)
    assert result.n == 3
    assert result.acc == pytest.approx(2 / 3)
    assert result.acc_norm == pytest.approx(1 / 3)
    assert result.acc_bytes == pytest.approx(2 / 3)
    assert result.perplexity is None and result.routing_blocks == () and result.active_experts_mean is None
    # Forwarded positions per request: context + continuation tokens - 1 (the last token is only a target).
    assert result.tokens == (3 + 7) * 2 + 3 + 4
    lo, hi = result.acc_ci
    assert 0.0 <= lo <= result.acc <= hi <= 1.0


def test_a_peaked_model_gets_every_item_right():
    table = torch.zeros(V, V)
    table[ord(" "), ord("y")] = 20.0  # after a space the model is sure the next character is "y"
    items = [mc("Q", ["yes", "no"], 0), mc("Q", ["no", "yes"], 1), mc("Q", ["maybe", "yes", "no"], 1)]
    result = evaluate_items(BigramStub(table), CharTokenizer(), "hand", items)
    assert (result.acc, result.acc_norm, result.acc_bytes) == (1.0, 1.0, 1.0)
    assert result.acc_ci == (1.0, 1.0)


def test_last_word_accuracy_is_greedy_match_and_perplexity_is_exact():
    table = torch.zeros(V, V)
    table[ord("a"), ord(" ")] = 5.0
    table[ord(" "), ord("b")] = 5.0
    items = [Item((("xa", " b"),), 0, ("b",)), Item((("xa", " c"),), 0, ("c",))]
    result = evaluate_items(BigramStub(table), CharTokenizer(), "lambada", items, kind="last_word")
    logp = torch.log_softmax(table, dim=-1)
    ll_b = float(logp[ord("a"), ord(" ")] + logp[ord(" "), ord("b")])
    ll_c = float(logp[ord("a"), ord(" ")] + logp[ord(" "), ord("c")])
    assert result.acc == 0.5  # " b" is the greedy continuation, " c" is not
    assert result.perplexity == pytest.approx(math.exp(-(ll_b + ll_c) / 2), rel=1e-5)
    assert result.acc_norm is None and result.acc_bytes is None
    lo, hi = result.perplexity_ci
    assert lo <= result.perplexity <= hi


def test_windows_are_truncated_on_the_left():
    # A bigram model only sees the previous token, so truncating the context changes nothing.
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    requests = [("a long context that does not fit", " in eight"), ("short", " x")]
    full = score_requests(BigramStub(table, max_seq_len=64), CharTokenizer(), requests)
    short_model = BigramStub(table, max_seq_len=12)
    short = score_requests(short_model, CharTokenizer(), requests)
    assert short_model.longest == 12
    for a, b in zip(full, short):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-5) and a.tokens == b.tokens
    # A continuation longer than the window keeps the tokens the window can predict.
    (clipped,) = score_requests(BigramStub(table, max_seq_len=4), CharTokenizer(), [("q", " abcdef")])
    assert clipped.tokens == 4 and clipped.window == 4


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    assert encode_pair(CharTokenizer(), "Answer: ", "yes") == ([ord(c) for c in "Answer:"], [ord(c) for c in " yes"])
    with pytest.raises(ValueError, match="context"):
        encode_pair(CharTokenizer(), "", "yes")


def tiny_gpt(router: str = "softmoe") -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, d_expert=16,
                           ffn="moe", router=router, k=2.0 if router == "softmoe" else 2, max_seq_len=64))




@pytest.mark.parametrize("router", ["softmoe", "topk"])
def test_batching_and_padding_do_not_change_scores_and_routing_counts_real_tokens(router, one_thread):
    model = tiny_gpt(router).train()
    items = [mc("The cat sat on the", ["mat", "hat", "very long answer here"], 0),
             mc("Q", ["a", "bb"], 1), mc("Another question?", ["no", "yes"], 1)]
    flat = [r for item in items for r in item.requests]
    layers_1: dict = {}
    s1 = score_requests(model, CharTokenizer(), flat, batch_size=1, layers=layers_1)
    result = evaluate_items(model, CharTokenizer(), "hand", items, batch_size=8)
    assert model.training  # mode restored
    s8 = score_requests(model, CharTokenizer(), flat, batch_size=8)
    for a, b in zip(s1, s8):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-4)
    # Padding is masked out of the MoE layers: the routed token counts equal the real tokens, and the
    # realized mean active experts do not depend on how requests were batched.
    assert result.tokens == sum(s.window for s in s8)
    assert all(layer.active_hist.sum() == result.tokens for layer in layers_1.values())
    assert result.routing_blocks == (0, 1)
    assert result.active_experts == pytest.approx(tuple(layers_1[b].active_mean for b in (0, 1)), abs=1e-9)
    assert all(0 < a <= 4 for a in result.active_experts)
    if router == "topk":
        assert result.active_experts == pytest.approx((2.0, 2.0))
    # FLOPs: per active expert 3 matmuls of 32 x 16 at 2 FLOPs per MAC, plus the 32 x 4 router per layer.
    assert result.expert_flops_per_token == pytest.approx(sum(a * 3 * 32 * 16 * 2 for a in result.active_experts))
    assert result.router_flops_per_token == pytest.approx(2 * (2 * 32 * 4))
    assert sum(result.expert_load[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=["nope"]), r"tasks=\['nope'\] must be distinct values from .*; unknown: \['nope'\]"),
    (dict(tasks=["piqa", "piqa"]), r"tasks=\['piqa', 'piqa'\] must be distinct"),
    (dict(tasks=[]), r"tasks=\[\] must name at least one task"),
    (dict(tasks=["piqa"], limit=0), "limit=0 must be None or an int >= 1"),
    (dict(tasks=["piqa"], batch_size=0), "batch_size=0 must be an int >= 1"),
    (dict(tasks=["piqa"], precision="fp16"), "precision='fp16'"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_tasks(BigramStub(torch.zeros(V, V)), CharTokenizer(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks="piqa"), "tasks='piqa' must be a list"),
    (dict(tasks=["piqa"], limit=1.5), "limit=1.5 must be None or an int"),
    (dict(tasks=["piqa"], batch_size=True), "batch_size=True must be an int"),
    (dict(tasks=["piqa"], seed="0"), "seed='0' must be an int"),
])
def test_arguments_of_the_wrong_type_raise_type_error_naming_them(kwargs, match):
    with pytest.raises(TypeError, match=match):
        evaluate_tasks(BigramStub(torch.zeros(V, V)), CharTokenizer(), **kwargs)


def test_score_requests_and_bootstrap_check_their_counts():
    with pytest.raises(ValueError, match="batch_size=0 must be an int >= 1"):
        score_requests(BigramStub(torch.zeros(V, V)), CharTokenizer(), [("q", " a")], batch_size=0)
    with pytest.raises(ValueError, match="precision='fp16' must be one of"):
        score_requests(BigramStub(torch.zeros(V, V)), CharTokenizer(), [("q", " a")], precision="fp16")
    with pytest.raises(ValueError, match="resamples=0 must be an int >= 1"):
        bootstrap_ci([0.0, 1.0], resamples=0)
    with pytest.raises(TypeError, match="resamples=10.0 must be an int"):
        bootstrap_ci([0.0, 1.0], resamples=10.0)


def test_evaluate_items_rejects_bad_kind_and_empty_items():
    model = BigramStub(torch.zeros(V, V))
    with pytest.raises(ValueError, match="kind="):
        evaluate_items(model, CharTokenizer(), "t", [mc("Q", ["a"], 0)], kind="generate")
    with pytest.raises(ValueError, match="items"):
        evaluate_items(model, CharTokenizer(), "t", [])
