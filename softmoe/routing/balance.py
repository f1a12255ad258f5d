"""Loss-free load balancing (DeepSeek-V3): a per-expert bias that shifts expert *selection* only.

Shape legend:
    T   tokens
    E   experts

Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (arXiv 2408.15664),
used by DeepSeek-V3 (arXiv 2412.19437, sec. 2.1.2). Each MoE layer keeps a bias b_E, not learned by
gradient. A router adds it to its selection scores; the combine weights use the unbiased scores, so the
bias decides *which* experts run, never how much they contribute. Between optimizer steps,
the router's `after_step` (called by `softmoe.train.controllers.step`) moves it towards balance:

    b_e <- b_e + u * sign(mean_e' load_e' - load_e)

with load_e the pairs routed to expert e on real tokens over all micro-batches of the step (u = 1e-3 in
the paper). The bias is a persistent buffer (state_dict, exact resume). The load is not stored anywhere: the
layer returns it in its statistics (`expert_counts`), the training loop sums it over the step and hands it to
`ExpertBias.step` after the optimizer step, so evaluation neither reads nor moves the balance state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softmoe.common.checks import check_bool, check_float
from softmoe.routing.base import RouterConfig

__all__ = ["BiasBalanceConfig", "ExpertBias", "expert_bias", "bias_update"]


@dataclass(frozen=True)
class BiasBalanceConfig(RouterConfig):
    """RouterConfig plus the loss-free balancing switch, for routers that support it (topk, softmoe)."""

    loss_free_bias: bool = False  # add a per-expert selection bias updated between steps (DeepSeek-V3)
    bias_update_rate: float = 1e-3  # u in b_e += u * sign(mean load - load_e); DeepSeek-V3 uses 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("loss_free_bias", self.loss_free_bias)
        check_float("bias_update_rate", self.bias_update_rate, 0.0, open_low=True)


def bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's loss-free balancing step: (E,) bias + rate * sign(mean load - load).

    Under-loaded experts (load below the mean) gain `rate`, over-loaded ones lose it.

    Args:
        bias_E: (E,) float32 selection bias.
        load_E: (E,) int64 or float routed pairs per expert over the step.
        rate: u > 0.
    """
    load = load_E.to(torch.float64)
    return bias_E + rate * torch.sign(load.mean() - load).to(bias_E.dtype)


class ExpertBias(nn.Module):
    """One layer's selection bias b_E (a persistent buffer).

    Attributes:
        bias_E: (E,) float32 selection bias, moved only by `step` between optimizer steps.
        rate: u, the update rate.
    """

    def __init__(self, num_experts: int, rate: float):
        super().__init__()
        self.rate = rate
        self.register_buffer("bias_E", torch.zeros(num_experts))

    def shift(self, score_TE: torch.Tensor) -> torch.Tensor:
        """(T, E) selection scores score + b (no gradient reaches b: it is a buffer)."""
        return score_TE + self.bias_E

    def step(self, load_E: torch.Tensor) -> None:
        """One balancing step from the step's routed pairs per expert (E,) (summed over its micro-batches)."""
        with torch.no_grad():
            self.bias_E.copy_(bias_update(self.bias_E, load_E.to(self.bias_E.device), self.rate))

    def stats(self) -> dict[str, torch.Tensor]:
        """Copies for the layer's stats (a later controller step must not change a reported value)."""
        return {"expert_bias": self.bias_E.clone(), "expert_bias_absmax": self.bias_E.abs().max()}


def expert_bias(config: RouterConfig) -> ExpertBias | None:
    """The ExpertBias a router with this config needs, or None when `loss_free_bias` is off."""
    if not getattr(config, "loss_free_bias", False):
        return None
    return ExpertBias(config.num_experts, config.bias_update_rate)
