"""Top-k token-choice router: softmax over experts, keep the k largest.

Shape legend:
    T   tokens
    D   d_model
    E   experts

`normalize=True` renormalises the kept probabilities to sum to 1 (Mixtral); `normalize=False`
uses the raw softmax probabilities (Switch k=1 / GShard).

`loss_free_bias=True` (DeepSeek-V3, see routing/balance.py) picks the k largest of P + b_E instead;
the combine weights are still the unbiased P of the picked experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softmoe.routing.base import (
    GateRouter,
    RouterOutput,
    finish_routing,
    real_tokens,
    register_router,
    router_logits,
)
from softmoe.routing.balance import BiasBalanceConfig, expert_bias
from softmoe.routing.record import routing_from_mask

__all__ = ["TopKConfig", "TopKRouter"]


@dataclass(frozen=True)
class TopKConfig(BiasBalanceConfig):
    normalize: bool = True  # renormalise the k kept probabilities to sum to 1 (Mixtral); False: Switch/GShard

    def __post_init__(self) -> None:
        super().__post_init__()
        if float(self.k) != int(self.k):
            raise ValueError(f"k={self.k} must be an integer in [1, num_experts={self.num_experts}] for router='topk'")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(self.normalize).__name__}")


@register_router("topk", TopKConfig)
class TopKRouter(GateRouter):
    """Hard top-k over softmax(W x). k is fixed; the budget does not apply (`uses_budget = False`)."""

    def __init__(self, d_model: int, config: TopKConfig):
        super().__init__(d_model, config)
        self.balance = expert_bias(config)  # loss-free selection bias, or None

    def forward(self, x_TD: torch.Tensor, mean_k=None, mask_T: torch.Tensor | None = None) -> RouterOutput:
        """Route T tokens to their k most probable experts.

        Args:
            x_TD: (T, D) token hidden states.
            mean_k: must be None (top-k has a fixed k).
            mask_T: optional (T,) bool, True = real token; padding is not routed.
        """
        if mean_k is not None:
            raise ValueError("router='topk' has a fixed k; mean_k must be None (only 'softmoe' takes a budget k_l)")
        real_T = real_tokens(mask_T, x_TD.shape[0], x_TD.device)
        logits_TE = router_logits(x_TD, self.gate.weight, real_T)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE if self.balance is None else self.balance.shift(probs_TE.detach())
        top_idx_TK = select_TE.topk(int(self.config.k), dim=-1).indices
        top_p_TK = probs_TE.gather(-1, top_idx_TK)
        if self.config.normalize:
            top_p_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
        weight_TE = torch.zeros_like(probs_TE).scatter(-1, top_idx_TK, top_p_TK)
        keep_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter(-1, top_idx_TK, True)
        routing = routing_from_mask(weight_TE, keep_TE & real_T.unsqueeze(-1))
        k = torch.tensor(float(self.config.k), device=x_TD.device)
        extra = None
        if self.balance is not None:
            self.balance.record(routing.counts_E)
            extra = self.balance.stats()
        return finish_routing(routing, logits_TE, real_T, self.config, k, extra_stats=extra)
