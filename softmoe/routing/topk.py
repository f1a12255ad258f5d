"""Top-k token-choice router: softmax over experts, keep the k largest.

Shape legend:
    T   tokens
    D   d_model
    E   experts

`normalize=True` renormalises the kept probabilities to sum to 1 (Mixtral); `normalize=False`
uses the raw softmax probabilities (Switch k=1 / GShard). The default (None) is Mixtral's for k > 1 and
Switch's for k = 1: renormalising a single kept probability makes every weight exactly 1, so the gate would
get no gradient from the loss (only from the auxiliary losses) and never learn to route by content.

`loss_free_bias=True` (DeepSeek-V3, see routing/balance.py) picks the k largest of P + b_E instead;
the combine weights are still the unbiased P of the picked experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softmoe.common.checks import check_bool
from softmoe.routing.balance import BiasBalanceConfig, expert_bias
from softmoe.routing.base import GateRouter, Rule, register_router

__all__ = ["TopKConfig", "TopKRouter"]


@dataclass(frozen=True)
class TopKConfig(BiasBalanceConfig):
    # renormalise the k kept probabilities to sum to 1 (Mixtral); False: raw softmax (Switch/GShard);
    # None: True for k > 1, False for k = 1 (a renormalised single weight is always 1: the gate would not learn)
    normalize: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalize is None:
            object.__setattr__(self, "normalize", self.k > 1)
        check_bool("normalize", self.normalize)
        if self.dispatch_cap is not None and self.dispatch_cap < self.k:
            raise ValueError(f"dispatch_cap={self.dispatch_cap} is below k={self.k:g}: top-k routes every token to k "
                             "experts, so every routing would exceed its static bound of tokens x dispatch_cap pairs")

    @classmethod
    def check_k(cls, k: float, num_experts: int) -> None:
        """k is a whole number of experts in [1, E]."""
        if float(k) != int(k) or not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be an integer in [1, num_experts={num_experts}] for router='topk'")


@register_router("topk", TopKConfig)
class TopKRouter(GateRouter):
    """Hard top-k over softmax(W x). k is fixed; the budget does not apply (`uses_budget = False`)."""

    label = "top-k"
    fixed_active_experts = True
    marker = "^"

    def __init__(self, d_model: int, config: TopKConfig):
        super().__init__(d_model, config)
        self.balance = expert_bias(config)  # loss-free selection bias, or None

    def rule(self, logits_TE: torch.Tensor, real_T: torch.Tensor, k: torch.Tensor) -> Rule:
        """The k most probable experts (of P + b with the loss-free bias), weighted by P."""
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE if self.balance is None else self.balance.shift(probs_TE.detach())
        top_idx_TK = select_TE.topk(int(self.config.k), dim=-1).indices
        top_p_TK = probs_TE.gather(-1, top_idx_TK)
        if self.config.normalize:
            top_p_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
        weight_TE = torch.zeros_like(probs_TE).scatter(-1, top_idx_TK, top_p_TK)
        keep_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter(-1, top_idx_TK, True)
        return Rule(self.to_routing(weight_TE, keep_TE & real_T.unsqueeze(-1)))
