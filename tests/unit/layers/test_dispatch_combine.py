"""dispatch / combine: the gather-table versions equal index_select / index_add (forward and backward),
for ragged routings with tokens that use 0, 1 or several experts; token_slots is the inverse table.

Run: .venv/bin/python -m pytest -q tests/unit/layers/test_dispatch_combine.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.layers import combine, dispatch
from softmoe.layers.moe import token_slots
from softmoe.routing.record import routing_from_mask


def ragged_routing(num_tokens: int, num_experts: int, seed: int, density: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(num_tokens, num_experts, generator=g) < density
    keep[0] = False  # a token with no expert (e.g. padding)
    keep[1] = True  # a token with every expert
    weight = torch.rand(num_tokens, num_experts, generator=g).requires_grad_()
    return routing_from_mask(weight, keep), weight


def test_token_slots_lists_each_tokens_pairs_in_order():
    routing, _ = ragged_routing(9, 4, seed=0)
    slots = token_slots(routing)
    n = routing.num_pairs
    assert slots.shape == (9, int(routing.active_per_token().max()))
    for t in range(9):
        mine = [int(i) for i in slots[t] if i != n]
        assert mine == [i for i in range(n) if int(routing.token_N[i]) == t]  # ascending pair order
    assert (slots[0] == n).all()


@pytest.mark.parametrize("static", [False, True])
def test_token_slots_of_one_token_list_its_pairs(static):
    # One token (a batch-1 decode step) takes a shortcut: its pairs 0..n-1 in order, padding pairs left out.
    keep = torch.tensor([[True, False, True, True, False]])
    routing = routing_from_mask(torch.rand(1, 5), keep, max_pairs=5 if static else None)
    assert token_slots(routing).tolist() == [[0, 1, 2]]
    assert token_slots(routing_from_mask(torch.rand(1, 5), torch.zeros(1, 5, dtype=torch.bool))).shape == (1, 0)


def test_token_slots_of_a_static_routing_leave_its_padding_out():
    """The padding pairs of a static-size routing (all on token 0) are not in the table: same width and same
    entries as the exact routing's, the empty-slot marker being the static routing's N."""
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(64, 8, generator=g) < 0.3
    weight = torch.rand(64, 8, generator=g)
    exact, static = routing_from_mask(weight, keep), routing_from_mask(weight, keep, max_pairs=64 * 8)
    slots_exact, slots_static = token_slots(exact), token_slots(static)
    assert slots_static.shape == slots_exact.shape  # not 64 x (the padding's length)
    n, n_max = exact.num_pairs, static.num_pairs
    assert torch.equal(torch.where(slots_static == n_max, n, slots_static), slots_exact)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dispatch_and_combine_equal_index_select_and_index_add(seed):
    routing, weight = ragged_routing(13, 5, seed)
    x = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    y_g = torch.randn(13, 6, dtype=torch.float64)

    x_ND = dispatch(x, routing)
    y = combine(x_ND.sin(), routing)
    (y * y_g).sum().backward()
    got = (y.detach(), x.grad.clone(), weight.grad.clone())

    x.grad, weight.grad = None, None
    routing = routing_from_mask(weight, weight.detach().new_zeros(weight.shape).index_put(
        (routing.token_N, routing.expert_N), torch.tensor(1.0)).bool())  # the same pairs, a fresh graph
    x_ref = x.index_select(0, routing.token_N)
    w_ND = routing.weight_N.unsqueeze(-1).to(x_ref.dtype) * x_ref.sin()
    y_ref = x.new_zeros(13, 6).index_add(0, routing.token_N, w_ND)
    (y_ref * y_g).sum().backward()
    for a, b in zip(got, (y_ref.detach(), x.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (got[0][0] == 0).all()  # the token without experts gets zeros


def test_dispatch_casts_rows_but_returns_gradients_in_the_input_dtype():
    routing, _ = ragged_routing(7, 3, seed=3)
    x = torch.randn(7, 4, requires_grad=True)
    x_ND = dispatch(x, routing, dtype=torch.bfloat16)
    assert x_ND.dtype == torch.bfloat16
    torch.testing.assert_close(x_ND, x.detach().to(torch.bfloat16).index_select(0, routing.token_N), rtol=0, atol=0)
    x_ND.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, routing.active_per_token().float().unsqueeze(-1).expand(7, 4))


def test_empty_routing_gives_zeros():
    weight = torch.rand(4, 3, requires_grad=True)
    routing = routing_from_mask(weight, torch.zeros(4, 3, dtype=torch.bool))
    x = torch.randn(4, 5, requires_grad=True)
    y = combine(dispatch(x, routing), routing)
    assert y.shape == (4, 5) and (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all()


def test_compiled_dispatch_and_combine_have_eager_gradients():
    """The device path (no gather table) traced by torch.compile: the same output and gradients as eager. With
    torch 2.11, wrapping combine's index_add in a custom autograd Function gave wrong gradients here."""
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(10, 4, generator=g) < 0.5
    x0, w0, y_g = torch.randn(10, 6, generator=g), torch.rand(10, 4, generator=g), torch.randn(10, 6, generator=g)

    def layer(x, w):
        routing = routing_from_mask(w, keep)
        return combine(dispatch(x, routing, None).sin(), routing, None)

    def run(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w)
        return (y, *torch.autograd.grad((y * y_g).sum(), [x, w]))

    eager = run(layer)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
