"""linear_cross_entropy (fused chunked head + loss) equals the unfused F.linear + F.cross_entropy in
value and gradients, with ignored targets and any chunk size; the decoder's return_logits=False path
gives the same loss and gradients as the logits path.

Run: .venv/bin/python -m pytest -q tests/unit/model/test_loss.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from softmoe.model import GPT, ModelConfig
from softmoe.model.loss import linear_cross_entropy


def reference(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t, ignore_index=-100)


def inputs(rows=50, d=12, v=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=dtype).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g, dtype=dtype)).requires_grad_()
    t = torch.randint(0, v, (rows,), generator=g)
    t[::5] = -100
    return x, w, t


def grads(fn, x, w, t, scale=0.5):
    x.grad = w.grad = None
    loss = fn(x, w, t)
    (scale * loss).backward()
    return loss.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 50, 1000])
def test_equals_unfused_fp32(chunk_rows):
    x, w, t = inputs()
    ref = grads(reference, x, w, t)
    got = grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=chunk_rows), x, w, t)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_unfused_within_bf16_rounding():
    x, w, t = inputs(rows=300, d=32, v=200)

    def under_autocast(fn):
        def run(a, b, c):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(a, b, c)
        return run

    ref = grads(under_autocast(reference), x, w, t)
    got = grads(under_autocast(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=64)), x, w, t)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_all_targets_ignored_gives_nan_like_cross_entropy_and_no_grad_needs_none():
    x, w, t = inputs()
    t[:] = -100
    assert math.isnan(linear_cross_entropy(x, w, t).item()) and math.isnan(reference(x, w, t).item())
    with torch.no_grad():
        x2, w2, t2 = inputs()
        torch.testing.assert_close(linear_cross_entropy(x2, w2, t2), reference(x2, w2, t2))


def test_bad_arguments_raise():
    x, w, t = inputs()
    with pytest.raises(ValueError, match="chunk_rows=0"):
        linear_cross_entropy(x, w, t, chunk_rows=0)
    with pytest.raises(ValueError, match="targets_R has shape"):
        linear_cross_entropy(x, w, t[:-1])
    with pytest.raises(ValueError, match="weight_VD"):
        linear_cross_entropy(x, w[:, :-1], t)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_decoder_without_logits_equals_logits_path(ffn):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_experts=4, d_expert=16,
                         max_seq_len=24, ffn=ffn, router="topk", k=2.0)
    model = GPT(config)
    idx = torch.randint(0, 97, (3, 24))
    targets = torch.randint(0, 97, (3, 24))
    targets[0, :5] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(idx, targets, return_logits=return_logits)
        out.objective.backward()
        assert (out.logits is None) == (not return_logits)
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(idx, return_logits=False)
