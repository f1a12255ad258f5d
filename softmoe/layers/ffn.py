"""The dense SwiGLU FFN: the "dense" baseline and the shared experts of an MoE layer.

Shape legend:
    B   batch, S sequence, D d_model, H d_hidden
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softmoe.common.checks import check_int

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """y = W_down (silu(W_gate x) * (W_up x)); one always-active "expert". (..., D) -> (..., D)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden)):
            check_int(name, value, 1)
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False)
        self.w_up = nn.Linear(d_model, d_hidden, bias=False)
        self.w_down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, S, D) (any leading shape works)."""
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
