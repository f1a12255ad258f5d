"""ExpertBank: grouped == padded == loop (forward and backward), empty experts, fallback shapes, errors.

Run: .venv/bin/python -m pytest -q tests/unit/layers/test_experts.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.layers import EXPERT_IMPLS, ExpertBank
from softmoe.layers import experts as experts_module
from softmoe.layers.experts import grouped_mm_supported, loop_experts, swiglu
from softmoe.layers.ffn import SwiGLU

# (counts per expert, d_model, d_hidden): empty experts first, last and in the middle; unaligned dims.
SHAPES = [
    ([200, 2, 2, 2, 2, 2, 2, 0], 16, 32),  # one overloaded expert: padded runs its overflow rows in a second batch
    ([50, 3, 60, 3], 16, 32),  # two overloaded experts, not adjacent: a second padded batch of both
    ([3, 0, 5, 0], 16, 32),
    ([0, 0, 7, 1], 8, 24),
    ([0, 0, 0, 0], 16, 32),
    ([2, 4, 1, 3], 3, 5),  # strides not 16-byte aligned: grouped falls back to the loop
]


def run(impl: str, counts, d_model, d_hidden, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    bank = ExpertBank(len(counts), d_model, d_hidden, impl=impl).to(dtype)
    x = torch.randn(sum(counts), d_model, dtype=dtype, requires_grad=True)
    y = bank(x, torch.tensor(counts))
    y.backward(torch.ones_like(y) if y.numel() == 0 else torch.randn_like(y))
    return y, x.grad, [p.grad for p in bank.parameters()]


@pytest.mark.parametrize("impl", ["grouped", "padded", "padded_batch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("counts,d_model,d_hidden", SHAPES)
def test_fast_impl_equals_loop(counts, d_model, d_hidden, dtype, tol, impl, monkeypatch):
    if impl == "padded_batch":  # the padded batch even for few rows (padded hands those to the loop)
        monkeypatch.setattr(experts_module, "_FEW_ROWS_PER_EXPERT", 0)
        impl = "padded"
    y_g, dx_g, dw_g = run(impl, counts, d_model, d_hidden, dtype)
    y_l, dx_l, dw_l = run("loop", counts, d_model, d_hidden, dtype)
    torch.testing.assert_close(y_g, y_l, rtol=tol, atol=tol)
    torch.testing.assert_close(dx_g, dx_l, rtol=tol, atol=tol)
    for g, l in zip(dw_g, dw_l):
        if g is None or l is None:  # no rows: neither path touches the weights
            assert sum(counts) == 0
            continue
        torch.testing.assert_close(g, l, rtol=tol, atol=tol)


def test_loop_matches_per_row_swiglu_and_empty_experts_get_zero_grad():
    counts = [2, 0, 3]
    torch.manual_seed(0)
    bank = ExpertBank(3, 8, 16, impl="loop")
    x = torch.randn(5, 8)
    y = bank(x, torch.tensor(counts))
    owner = [0, 0, 2, 2, 2]
    for i, e in enumerate(owner):
        torch.testing.assert_close(y[i], swiglu(x[i:i + 1], bank.w_gate[e], bank.w_up[e], bank.w_down[e])[0])
    y.square().sum().backward()
    assert bank.w_up.grad[1].abs().sum() == 0 and bank.w_up.grad[0].abs().sum() > 0


def test_grouped_mm_is_used_on_this_build_for_aligned_shapes():
    # Documents what torch offers here; if this fails, `grouped` silently runs the loop.
    assert grouped_mm_supported(torch.device("cpu"), torch.float32, 512, 1024)
    assert not grouped_mm_supported(torch.device("cpu"), torch.float32, 3, 5)


def test_registry_and_errors():
    assert {"loop", "grouped", "padded"} <= set(EXPERT_IMPLS)
    with pytest.raises(ValueError, match="impl='fast'"):
        ExpertBank(2, 4, 4, impl="fast")
    with pytest.raises(ValueError, match="num_experts=0 must be an int >= 1"):
        ExpertBank(0, 4, 4)
    with pytest.raises(ValueError, match="d_hidden=-1 must be an int >= 1"):
        ExpertBank(2, 4, -1)
    with pytest.raises(TypeError, match="num_experts=2.0 must be an int >= 1"):
        ExpertBank(2.0, 4, 4)
    with pytest.raises(TypeError, match="d_model=True must be an int >= 1"):
        ExpertBank(2, True, 4)


def test_dense_ffn_checks_its_widths():
    assert SwiGLU(4, 8)(torch.zeros(2, 4)).shape == (2, 4)
    with pytest.raises(ValueError, match="d_model=0 must be an int >= 1"):
        SwiGLU(0, 8)
    with pytest.raises(TypeError, match="d_hidden=8.0 must be an int >= 1"):
        SwiGLU(4, 8.0)


def test_padded_capacity_trades_padding_against_overflow():
    from softmoe.layers.experts import _bucket, _padded_capacity

    assert _padded_capacity([256] * 60 + [300, 310, 320, 330]) == (256, 80)  # a few overloaded experts overflow
    assert _padded_capacity([250, 240, 245, 255]) == (256, 0)  # near balance: pad to the largest (bucketed)
    assert _padded_capacity([250, 260, 255, 270]) == (256, 14)  # 288 rows each would cost more than 14 extra
    assert _padded_capacity([200, 2, 2, 2, 2, 2, 2, 0]) == (2, 208)  # one hot expert: overflow beats padding
    assert _padded_capacity([0, 0]) == (1, 0)


def test_bucket_rounds_up_by_at_most_an_eighth_to_few_sizes():
    from softmoe.layers.experts import _bucket

    sizes = {_bucket(n) for n in range(1025, 2049)}  # 1152, 1280, ..., 2048
    assert len(sizes) == 8 and all(_bucket(n) >= n and _bucket(n) <= n * 9 / 8 for n in range(1, 5000))
    assert [_bucket(n) for n in (1, 2, 7, 15, 16, 17, 1000)] == [1, 2, 7, 15, 16, 18, 1024]


def test_auto_picks_grouped_on_cuda_and_padded_on_cpu():
    from softmoe.layers.experts import auto_impl, grouped_experts, padded_experts

    assert auto_impl(torch.device("cuda")) == "grouped"
    assert auto_impl(torch.device("cpu")) == "padded"
    bank = ExpertBank(4, 16, 16)
    assert bank.impl == "auto" and bank.impl_fn(torch.device("cpu")) is padded_experts
    assert bank.impl_fn(torch.device("cuda")) is grouped_experts
    forced = ExpertBank(4, 16, 16, impl="grouped")
    assert forced.impl_fn(torch.device("cpu")) is grouped_experts


def test_grouped_zeroes_rows_past_the_last_offset():
    """A dispatch padded to a static bound has rows after the last segment: grouped_mm leaves them unwritten,
    the bank returns zeros there (and the padded rows get no gradient)."""
    from softmoe.layers.experts import grouped_experts

    torch.manual_seed(0)
    bank = ExpertBank(3, 16, 16)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(9, 16, requires_grad=True)  # 5 routed rows, 4 past the last offset
    x_garbage = x.detach().clone()
    x_garbage[5:] = float("nan")
    y = grouped_experts(x_garbage.requires_grad_(), counts, bank.w_gate, bank.w_up, bank.w_down)
    assert torch.equal(y[5:], torch.zeros(4, 16))
    ref = loop_experts(x[:5], counts, bank.w_gate, bank.w_up, bank.w_down)
    torch.testing.assert_close(y[:5], ref)


def test_grouped_mm_probe_runs_under_no_grad_and_keeps_the_rng():
    """The probe (a backward) must work when first reached in an eval forward under no_grad, and must not
    draw from the global RNG."""
    from softmoe.layers.experts import _probe_grouped_mm

    state = torch.get_rng_state()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _probe_grouped_mm("cpu", torch.float32) and _probe_grouped_mm("cpu", torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), state)


def test_padded_runs_few_rows_expert_by_expert(monkeypatch):
    """Decoding-sized inputs (<= 4 rows per expert on average) run only the non-empty experts (the loop), so the
    time follows the active experts; more rows run the padded batch."""
    calls = []
    monkeypatch.setattr(experts_module, "loop_experts",
                        lambda x, counts, *w: calls.append(x.shape[0]) or loop_experts(x, counts, *w))
    bank = ExpertBank(32, 8, 16, impl="padded")
    counts = torch.zeros(32, dtype=torch.int64)
    counts[[3, 17]] = 1  # one token, two experts
    bank(torch.randn(2, 8), counts)
    many = torch.full((32,), 6)
    many[0] = 200 - 31 * 6
    bank(torch.randn(200, 8), many)
    assert calls == [2]
