"""Aux losses and routing statistics: values at balance/collapse, padding excluded.

Run: .venv/bin/python -m pytest -q tests/unit/routing/test_routing_losses.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.routing import losses


def test_load_balance_is_one_at_balance_and_e_at_collapse():
    mask = torch.ones(8)
    uniform = torch.full((8, 4), 0.25)
    assert float(losses.load_balance_loss(torch.tensor([2, 2, 2, 2]), uniform, mask)) == pytest.approx(1.0)
    onehot = torch.zeros(8, 4)
    onehot[:, 1] = 1.0
    assert float(losses.load_balance_loss(torch.tensor([0, 8, 0, 0]), onehot, mask)) == pytest.approx(4.0)


def test_padding_is_excluded_from_means():
    logits = torch.randn(6, 4)
    mask = torch.tensor([1.0, 1, 1, 1, 0, 0])
    padded = torch.cat([logits[:4], torch.full((2, 4), 50.0)])
    assert float(losses.z_loss(padded, mask)) == pytest.approx(float(losses.z_loss(logits[:4], torch.ones(4))))
    probs = torch.softmax(padded, -1)
    assert float(losses.load_balance_loss(torch.tensor([1, 1, 1, 1]), probs, mask)) == pytest.approx(
        float(losses.load_balance_loss(torch.tensor([1, 1, 1, 1]), probs[:4], torch.ones(4))))


def test_histogram_and_load():
    hist = losses.active_histogram(torch.tensor([1, 2, 2, 0]), torch.tensor([1.0, 1, 1, 0]), 3)
    torch.testing.assert_close(hist, torch.tensor([0.0, 1, 2, 0]))
    torch.testing.assert_close(losses.expert_load(torch.tensor([1, 3, 0])), torch.tensor([0.25, 0.75, 0.0]))
    torch.testing.assert_close(losses.expert_load(torch.tensor([0, 0])), torch.tensor([0.0, 0.0]))
