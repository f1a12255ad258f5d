"""The dense SwiGLU FFN: the "dense" baseline, with the same call interface as MoELayer.

Shape legend:
    B   batch, S sequence, D d_model, H d_hidden
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softmoe.routing.base import LayerStats

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """y = W_down (silu(W_gate x) * (W_up x)); one always-active "expert".

    Takes (and ignores) `mean_k` and `pad_mask_BS` so it can stand wherever an MoELayer does; its
    `aux_loss` is 0 and its `stats` report one active expert per token.
    """

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False)
        self.w_up = nn.Linear(d_model, d_hidden, bias=False)
        self.w_down = nn.Linear(d_hidden, d_model, bias=False)
        self.aux_loss = torch.zeros(())
        self.stats = self._stats(0)

    @staticmethod
    def _stats(num_tokens: int) -> LayerStats:
        one, zero = torch.ones(()), torch.zeros(())
        hist = torch.tensor([0.0, float(num_tokens)])
        return LayerStats({"k": one, "active_experts_mean": one, "active_experts_hist": hist,
                           "expert_load": torch.ones(1), "load_balance_loss": zero, "z_loss": zero})

    def forward(self, x_BSD: torch.Tensor, mean_k=None, pad_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, D) -> (B, S, D) (any leading shape works)."""
        self.aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        self.stats = self._stats(x_BSD[..., 0].numel() if pad_mask_BS is None else int(pad_mask_BS.sum()))
        return self.w_down(F.silu(self.w_gate(x_BSD)) * self.w_up(x_BSD))
