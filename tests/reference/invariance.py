"""Shared checks that a MoE layer routes each token on its own: batch-, decoding- and padding-invariant."""

from __future__ import annotations

import pytest
import torch


def assert_batch_and_decoding_invariant(layer, d_model: int) -> None:
    """A token's output is the same (<= 1e-6) in another batch and when run alone."""
    x = torch.randn(4, 6, d_model)
    full = layer(x).output
    other = torch.cat([torch.randn(2, 6, d_model) * 3, x[1:3]], dim=0)
    torch.testing.assert_close(layer(other).output[2:], full[1:3], rtol=0, atol=1e-6)
    for b, s in [(0, 0), (1, 3), (3, 5)]:
        torch.testing.assert_close(layer(x[b:b + 1, s:s + 1]).output[0, 0], full[b, s], rtol=0, atol=1e-6)


def assert_padding_ignored(layer, d_model: int, stat_names: tuple[str, ...]) -> None:
    """NaN padding changes no real token's output, no listed stat, the histogram or the aux loss; pads get 0."""
    x = torch.randn(2, 5, d_model)
    y, aux, stats, _ = layer(x)
    padded = torch.cat([x, torch.full((2, 3, d_model), float("nan"))], dim=1)  # garbage in the padding
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1).bool()
    y_pad, aux_pad, stats_pad, _ = layer(padded, attention_mask=mask)
    torch.testing.assert_close(y_pad[:, :5], y, rtol=0, atol=1e-6)
    assert torch.equal(y_pad[:, 5:], torch.zeros(2, 3, d_model))
    for name in stat_names:
        assert stats_pad[name] == pytest.approx(float(stats[name]), abs=1e-6), name
    torch.testing.assert_close(stats_pad["active_experts_hist"], stats["active_experts_hist"])
    torch.testing.assert_close(aux_pad.detach(), aux.detach(), rtol=0, atol=1e-6)
