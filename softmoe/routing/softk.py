"""The SoftMoE router: LapSum soft top-k with a learned mean number of active experts, truncated.

Shape legend:
    T   tokens
    D   d_model
    E   experts

Per token (METHOD.md, "SoftMoE layer"):
    1. r = W x in fp32.
    2. p = soft_topk(r, k_l, alpha): p_i in (0, 1), sum_i p_i = k_l, so k_l is the mean number of
       active experts. k_l comes from the model's Budget (`mean_k`) or, standalone, from this router.
    3. Truncation: experts with p_i < min_weight are dropped (optional cap `max_active`); every token
       keeps at least its top expert. Peaked scores keep about ceil(k_l) experts, flat scores more.
    4. Combine weights over the kept experts, by `combine`:
         mask_softmax      w = p * softmax(r), renormalised over kept experts (soft Mixtral; default)
         mask_softmax_raw  w = p * softmax(r), not renormalised (soft Switch)
         p                 w = p / k_l
Routing depends on the token alone, so outputs are batch invariant and causal.

`loss_free_bias=True` (DeepSeek-V3, see routing/balance.py): the per-expert bias b_E (logit units) is
added to r for *selection* only. Truncation (step 3) uses p_sel = soft_topk(r + b, k_l, alpha); the
combine weights (step 4) use the unbiased p = soft_topk(r, k_l, alpha) and softmax(r), so b moves which
experts are computed, never their weights, and gets no gradient. This costs a second threshold solve.
The bias shifts the soft top-k's scores rather than p itself because the threshold solve is what turns
scores into the set that survives truncation; adding b to p would bypass the sum-to-k_l constraint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from softmoe.ops.lapsum import soft_topk
from softmoe.routing.base import (
    GateRouter,
    RouterOutput,
    check_float,
    finish_routing,
    real_tokens,
    register_router,
    router_logits,
)
from softmoe.routing.balance import BiasBalanceConfig, expert_bias
from softmoe.routing.budget import Budget
from softmoe.routing.record import Routing, routing_from_mask, select_experts

__all__ = ["SoftKConfig", "SoftKRouter", "COMBINE_MODES", "combine_weights", "soft_routing"]

COMBINE_MODES = ("mask_softmax", "mask_softmax_raw", "p")


@dataclass(frozen=True)
class SoftKConfig(BiasBalanceConfig):
    alpha: float = 0.1  # Laplace scale of the soft top-k, in logit units; smaller is harder (-> hard top-k)
    learn_alpha: bool = False  # learn alpha (as log alpha) by gradient
    min_weight: float = 0.05  # truncation tau: experts with p < tau are not computed
    max_active: int | None = None  # optional hard cap on experts per token
    combine: str = "mask_softmax"  # combine weights, one of COMBINE_MODES
    learn_k: bool = False  # standalone layer only: learn k in [k_min, E - margin], penalised towards k
    k_min: float = 1.0  # standalone learn_k: lower bound of k
    margin: float = 0.5  # standalone learn_k: upper bound E - margin
    k_penalty_coef: float = 1.0  # standalone learn_k: weight of (k_learned - k)^2 in aux_loss

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts == 1:
            if self.k != 1:
                raise ValueError(f"k={self.k} must be 1 for router='softmoe' with num_experts=1")
        elif not self.k < self.num_experts:
            raise ValueError(f"k={self.k} must be in (0, num_experts={self.num_experts}) for router='softmoe'")
        check_float("alpha", self.alpha, 0.0, open_low=True)
        check_float("min_weight", self.min_weight, 0.0, 1.0)
        check_float("k_penalty_coef", self.k_penalty_coef, 0.0)
        if self.max_active is not None and (
            isinstance(self.max_active, bool) or not isinstance(self.max_active, int)
            or not 1 <= self.max_active <= self.num_experts
        ):
            raise ValueError(f"max_active={self.max_active!r} must be None or an int in [1, {self.num_experts}]")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine={self.combine!r} must be one of {COMBINE_MODES}")
        for name in ("learn_alpha", "learn_k"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")


def combine_weights(
    p_TE: torch.Tensor, logits_TE: torch.Tensor, keep_TE: torch.Tensor, k: torch.Tensor, mode: str
) -> torch.Tensor:
    """(T, E) float32 combine weights from soft top-k probabilities (see the module docstring).

    Args:
        p_TE: (T, E) soft top-k inclusion probabilities, rows sum to k.
        logits_TE: (T, E) float32 router scores.
        keep_TE: (T, E) bool kept pairs (only kept entries are used downstream).
        k: 0-d mean active experts.
        mode: one of COMBINE_MODES.
    """
    if mode == "p":
        return p_TE / k
    w_TE = p_TE * torch.softmax(logits_TE, dim=-1)
    if mode == "mask_softmax_raw":
        return w_TE
    w_TE = torch.where(keep_TE, w_TE, 0.0)
    # The kept top expert has p >= k/E and softmax >= 1/E, so the sum is > 0 for every routed token;
    # the clamp only guards unrouted (padding) rows.
    return w_TE / w_TE.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(w_TE.dtype).tiny)


@register_router("softmoe", SoftKConfig)
class SoftKRouter(GateRouter):
    """Truncated LapSum soft top-k router; k_l from the budget (`mean_k`) or its own k.

    Standalone (mean_k=None) the layer is a one-layer budget: k fixed at `config.k`, or with
    `learn_k=True` a learned k in [k_min, E - margin] with penalty k_penalty_coef (k - config.k)^2.
    """

    uses_budget = True

    def __init__(self, d_model: int, config: SoftKConfig):
        super().__init__(d_model, config)
        log_alpha = torch.tensor(math.log(config.alpha))
        if config.learn_alpha:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)
        self.own_k = None
        if config.learn_k and config.num_experts > 1:
            self.own_k = Budget(1, config.num_experts, config.k, k_min=config.k_min, margin=config.margin,
                                mode="penalty", penalty_coef=config.k_penalty_coef)
        self.balance = expert_bias(config)  # loss-free selection bias, or None

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def _layer_k(self, mean_k, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's k (0-d float32) and the standalone penalty (or None)."""
        if mean_k is not None:
            if not isinstance(mean_k, torch.Tensor) or mean_k.dim() != 0:
                raise ValueError(f"mean_k must be a 0-d tensor (this layer's k_l), got {mean_k!r}")
            return mean_k.float(), None
        if self.own_k is not None:
            return self.own_k()[0], self.own_k.penalty()
        return torch.tensor(float(self.config.k), device=device), None

    def forward(self, x_TD: torch.Tensor, mean_k=None, mask_T: torch.Tensor | None = None) -> RouterOutput:
        """Route T tokens by truncated soft top-k.

        Args:
            x_TD: (T, D) token hidden states.
            mean_k: optional 0-d tensor k_l in (0, E) from the model's Budget (differentiable).
            mask_T: optional (T,) bool, True = real token; padding is not routed.
        """
        cfg = self.config
        real_T = real_tokens(mask_T, x_TD.shape[0], x_TD.device)
        k, penalty = self._layer_k(mean_k, x_TD.device)
        logits_TE = router_logits(x_TD, self.gate.weight, real_T)
        routing, extra = soft_routing(logits_TE, k, self.alpha, cfg, real_T, self._selection_p(logits_TE, k))
        if self.balance is not None:
            self.balance.record(routing.counts_E)
            extra.update(self.balance.stats())
        return finish_routing(routing, logits_TE, real_T, cfg, k, penalty, extra)

    def _selection_p(self, logits_TE: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """(T, E) soft_topk(r + b) that decides truncation with the loss-free bias; None without it."""
        if self.balance is None or self.num_experts == 1:
            return None
        with torch.no_grad():  # selection only: no gradient through the biased solve
            return soft_topk(self.balance.shift(logits_TE), k, self.alpha)


def soft_routing(logits_TE: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, config: SoftKConfig,
                 real_T: torch.Tensor, selection_p_TE: torch.Tensor | None = None) -> tuple[Routing, dict]:
    """The SoftMoE rule on given router scores: soft top-k -> truncation -> combine weights.

    Shared by SoftKRouter and the retrofitted transformers blocks (softmoe/convert), which bring their own gate.

    Args:
        logits_TE: (T, E) float32 router scores r.
        k: 0-d (or (T, 1)) tensor, the layer's k_l in (0, E).
        alpha: 0-d tensor, the Laplace scale.
        config: the rule's settings (min_weight, max_active, combine).
        real_T: (T,) bool, True for real tokens; padding is not routed.
        selection_p_TE: optional (T, E) probabilities that decide truncation instead of p (loss-free bias).
    Returns:
        (routing, extra): the routing to dispatch and the 0-d stats `alpha` and `kept_mass` (mass of p kept).
    """
    if logits_TE.shape[-1] == 1:
        p_TE = torch.ones_like(logits_TE)  # the only expert is always fully active
    else:
        p_TE = soft_topk(logits_TE, k, alpha)
    select_TE = p_TE if selection_p_TE is None else selection_p_TE
    keep_TE = select_experts(select_TE, config.min_weight, config.max_active) & real_T.unsqueeze(-1)
    weight_TE = combine_weights(p_TE, logits_TE, keep_TE, k, config.combine)
    kept_mass = (p_TE * keep_TE).sum(-1).sum() / real_T.sum().clamp(min=1)
    return routing_from_mask(weight_TE, keep_TE), {"alpha": alpha, "kept_mass": kept_mass}
