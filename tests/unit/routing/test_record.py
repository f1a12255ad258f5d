"""Unit tests of the shared Routing record and truncation.

Run: .venv/bin/python -m pytest tests/unit/routing/test_record.py -q
"""

from __future__ import annotations

import pytest
import torch

from softmoe.routing import Routing, routing_from_mask, select_experts, truncate


def test_truncate_small_example():
    weights = torch.tensor([[0.9, 0.05, 0.6], [0.02, 0.01, 0.03], [0.5, 0.5, 0.0]])
    routing = truncate(weights, min_weight=0.1)
    # token 1 has nothing above 0.1 and keeps its best expert (2)
    assert routing.expert_N.tolist() == [0, 0, 1, 2, 2]
    assert routing.token_N.tolist() == [0, 2, 2, 0, 1]
    assert routing.counts_E.tolist() == [2, 1, 2]
    assert routing.offsets_E1.tolist() == [0, 2, 3, 5]
    assert routing.active_per_token().tolist() == [2, 1, 2]
    torch.testing.assert_close(routing.weight_N, torch.tensor([0.9, 0.5, 0.5, 0.6, 0.03]))


def test_max_active_keeps_largest():
    weights = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    routing = truncate(weights, min_weight=0.0, max_active=2)
    assert sorted(routing.expert_N.tolist()) == [1, 2]


def test_dense_weights_round_trip_and_gradient():
    weights = torch.rand(5, 4, requires_grad=True)
    routing = truncate(weights, min_weight=0.5)
    dense = routing.dense_weights()
    kept = dense != 0
    torch.testing.assert_close(dense[kept], weights.detach()[kept])
    dense.sum().backward()
    assert torch.equal(weights.grad, kept.float())


def test_empty_experts_and_zero_tokens():
    routing = truncate(torch.tensor([[1.0, 0.0, 0.0]]), min_weight=0.5)
    assert routing.counts_E.tolist() == [1, 0, 0]
    empty = truncate(torch.zeros(0, 3))
    assert empty.num_pairs == 0 and empty.counts_E.tolist() == [0, 0, 0]


def test_routing_is_frozen():
    routing = truncate(torch.rand(2, 2))
    with pytest.raises(Exception):
        routing.num_tokens = 3  # type: ignore[misc]
    assert isinstance(routing, Routing)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(min_weight=-0.1), ValueError, r"min_weight=-0\.1 must be a finite number >= 0"),
        (dict(min_weight=float("nan")), ValueError, r"min_weight=nan"),
        (dict(max_active=0), ValueError, r"max_active=0 must be in \[1, num_experts=3\]"),
        (dict(max_active=4), ValueError, r"max_active=4"),
        (dict(max_active=1.5), TypeError, r"max_active=1\.5 must be None or an int"),
        (dict(min_weight="0.1"), TypeError, r"min_weight must be a float, got str '0\.1'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        select_experts(torch.rand(2, 3), **kwargs)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"score_TE must be 2-D"):
        select_experts(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"must be the same 2-D shape"):
        routing_from_mask(torch.rand(2, 3), torch.ones(3, 2, dtype=torch.bool))
