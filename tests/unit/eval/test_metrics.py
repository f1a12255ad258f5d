"""Bits per byte, compute cost from a measured routing, PTB text reconstruction, eval settings and CLI parsing.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_metrics.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softmoe.cli.eval import parse_budgets, parse_list, parse_tasks
from softmoe.eval.evaluate import EvalSettings, ptb_lines
from softmoe.eval.flops import compute_cost
from softmoe.eval.perplexity import LayerRouting, bits_per_byte, evaluate_split
from softmoe.model import GPT
from softmoe.model.config import ModelConfig


def test_bits_per_byte_formula():
    # one nat per token, one token per byte: 1 / ln 2 bits per byte
    assert bits_per_byte(1.0, 100, 100) == pytest.approx(1 / math.log(2))
    # ln 2 nats per token = 1 bit per token; 4 bytes per token -> 0.25 bits per byte
    assert bits_per_byte(math.log(2), 1000, 4000) == pytest.approx(0.25)
    assert bits_per_byte(3.0, 250, 1000) == pytest.approx(3.0 * 250 / (1000 * math.log(2)))


@pytest.mark.parametrize("args, error, match", [
    ((1.0, 10, 0), ValueError, "num_bytes=0 must be an int >= 1"), ((1.0, -1, 10), ValueError, "tokens=-1"),
    ((float("nan"), 10, 10), ValueError, "loss=nan"), ((-0.5, 10, 10), ValueError, "loss=-0.5 must be"),
    ((1.0, 10, 2.5), TypeError, "num_bytes=2.5 must be an int"), ((1.0, 1.0, 10), TypeError, "tokens=1.0"),
    (("1.0", 10, 10), TypeError, "loss must be a float, got str '1.0'"),
])
def test_bits_per_byte_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        bits_per_byte(*args)


def tiny_model(**changes) -> GPT:
    base = dict(vocab_size=64, d_model=16, n_layers=3, n_heads=2, d_ff=32, num_experts=4, d_expert=8,
                max_seq_len=16)
    return GPT(ModelConfig(**{**base, **changes}))


def test_evaluate_split_checks_max_batches():
    tokens = np.arange(200, dtype=np.int64) % 64
    assert evaluate_split(tiny_model(), tokens, 8, batch_size=2, max_batches=1).tokens == 16
    with pytest.raises(ValueError, match="max_batches=0 must be None or an int >= 1"):
        evaluate_split(tiny_model(), tokens, 8, max_batches=0)
    with pytest.raises(TypeError, match="max_batches=1.5 must be None or an int >= 1"):
        evaluate_split(tiny_model(), tokens, 8, max_batches=1.5)


def routing(block: int, active_mean: float, num_experts: int = 4) -> LayerRouting:
    # 10 tokens: a histogram over 0..E active experts whose mean is active_mean (two bins)
    low = int(math.floor(active_mean))
    hist = np.zeros(num_experts + 1)
    frac = active_mean - low
    hist[low] = 10 * (1 - frac)
    if frac:
        hist[low + 1] = 10 * frac
    return LayerRouting(block, active_mean, hist, np.ones(num_experts))


def test_cost_of_a_dense_model_is_its_ffn_matmuls():
    model = tiny_model(ffn="dense")
    cost = compute_cost(model, [])
    assert cost.expert_flops_per_token == pytest.approx(3 * 2 * 3 * 16 * 32)  # 3 blocks, SwiGLU = 3 matrices
    assert cost.router_flops_per_token == 0
    assert cost.active_params == cost.total_params == model.num_params()
    assert cost.active_params_non_embedding == model.num_params() - 64 * 16


def test_cost_of_an_moe_model_counts_the_realized_experts():
    model = tiny_model(ffn="moe", router="softmoe", k=2.0, moe_every=1)
    per_expert = 3 * 16 * 8
    layers = [routing(0, 1.0), routing(1, 2.5), routing(2, 3.0)]
    cost = compute_cost(model, layers)
    assert cost.per_layer_expert_flops == pytest.approx([2 * per_expert * a for a in (1.0, 2.5, 3.0)])
    assert cost.expert_flops_per_token == pytest.approx(2 * per_expert * 6.5)
    assert cost.router_flops_per_token == pytest.approx(3 * 2 * 16 * 4)
    unused = (4 - 1.0) + (4 - 2.5) + (4 - 3.0)
    assert cost.active_params == pytest.approx(model.num_params() - unused * per_expert)


def test_cost_mixes_dense_and_moe_blocks_and_needs_every_moe_block():
    model = tiny_model(ffn="moe", router="topk", k=2, moe_every=2, n_layers=4)  # MoE blocks 1 and 3
    cost = compute_cost(model, [routing(1, 2.0), routing(3, 2.0)])
    dense, expert = 2 * 3 * 16 * 32, 2 * 3 * 16 * 8
    assert cost.per_layer_expert_flops == pytest.approx([dense, 2 * expert, dense, 2 * expert])
    with pytest.raises(ValueError, match="MoE block 3"):
        compute_cost(model, [routing(1, 2.0)])


def test_ptb_lines_rebuilds_sentences_from_word_ids():
    vocab = {"<eos>": 0, "the": 1, "cat": 2, "<unk>": 3}
    ids = np.array([1, 2, 0, 3, 0, 1], dtype=np.uint16)
    assert ptb_lines(ids, vocab, eos_id=0) == ["the cat", "<unk>", "the"]


@pytest.mark.parametrize("field, value, match", [
    ("splits", ("val", "dev"), r"splits=\['val', 'dev'\] must be distinct values from .*; unknown: \['dev'\]"),
    ("splits", ("val", "val"), r"splits=\['val', 'val'\] must be distinct"), ("splits", (), "splits=\\[\\]"),
    ("corpora", ("wiki",), "corpora="), ("limit", 0, "limit=0 must be None or an int >= 1"),
    ("batch_size", -1, "batch_size=-1"), ("precision", "fp16", "precision='fp16'"),
    ("budgets", (1.0, float("inf")), r"budgets\[1\]=inf must be a finite number"),
])
def test_eval_settings_reject_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        EvalSettings(**{field: value})


@pytest.mark.parametrize("field, value, match", [
    ("splits", "val", "splits='val' must be a list"), ("max_batches", True, "max_batches=True must be None or an int"),
    ("limit", 2.0, "limit=2.0"), ("budgets", ("1.5",), r"budgets\[0\] must be a float, got str '1.5'"),
    ("seed", None, "seed=None must be an int"),
])
def test_eval_settings_reject_wrong_types(field, value, match):
    with pytest.raises(TypeError, match=match):
        EvalSettings(**{field: value})


def test_cli_list_parsers():
    assert parse_list("val, test", "--splits") == ("val", "test")
    assert parse_tasks("none") == () and parse_tasks("all") == ("all",)
    assert parse_tasks("piqa,arc_easy") == ("piqa", "arc_easy")
    assert parse_budgets("1,1.5,2.0") == (1.0, 1.5, 2.0)
    for call, match in [(lambda: parse_list("val,,test", "--splits"), "--splits="),
                        (lambda: parse_budgets("1.0,x"), "'x' is not a number"),
                        (lambda: parse_budgets("1.0,1.0"), "twice"),
                        (lambda: parse_tasks("all,piqa"), "'all' cannot be combined")]:
        with pytest.raises(ValueError, match=match):
            call()


def test_compute_cost_is_pure():
    model = tiny_model(ffn="moe", router="softmoe", k=2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compute_cost(model, [routing(i, 2.0) for i in range(3)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
