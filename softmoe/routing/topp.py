"""Top-p (threshold) token-choice router: the fewest experts whose probability mass reaches p.

Shape legend:
    T   tokens
    D   d_model
    E   experts

Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (arXiv 2403.07652).
Per token:
    1. P = softmax(W x) over the E experts, in fp32.
    2. Sort P descending and keep the shortest prefix whose cumulative mass is >= p (the expert that
       crosses p is kept), at most `max_active` experts. Confident tokens use one expert, uncertain
       tokens several.
    3. Combine weights are the kept probabilities, not renormalised (as in the authors' released
       code); `normalize=True` renormalises them among the kept experts instead.
    4. aux_loss = the shared load-balancing and z-losses (`finish_routing`) + entropy_coef * the mean
       entropy of P, their "dynamic loss": without it the router could flatten P and buy more experts
       for every token.
Routing depends on the token alone, so outputs are batch invariant and causal.

The paper's settings are p = 0.4, dynamic-loss weight 1e-4 and balance weight 1e-2 (the defaults
here except lb_coef, which stays the shared default so peers are compared on one balance weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softmoe.common.checks import check_bool, check_float, check_int
from softmoe.routing import losses
from softmoe.routing.base import GateRouter, RouterConfig, Rule, register_router

__all__ = ["TopPConfig", "TopPRouter", "top_p_mask", "router_entropy"]


@dataclass(frozen=True)
class TopPConfig(RouterConfig):
    """Top-p router config.

    `k` (required by the registry) does NOT affect selection: the number of experts per token is set
    by `p` and `max_active`. It is the layer's nominal budget, reported as `stats["k"]` (and used by
    the model config for its active-parameter count); the realised count is
    `stats["active_experts_mean"]`. Match budgets by choosing p, not k.
    """

    p: float = 0.4  # cumulative probability threshold in (0, 1]; the paper uses 0.4
    max_active: int | None = None  # cap on experts per token, in [1, E]; None = no cap (the paper)
    entropy_coef: float = 1e-4  # weight of the dynamic (router entropy) loss in aux_loss (paper: 1e-4)
    normalize: bool = False  # renormalise the kept probabilities to sum to 1; False = raw P (paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("p", self.p, 0.0, 1.0, open_low=True)
        check_float("entropy_coef", self.entropy_coef, 0.0)
        check_int("max_active", self.max_active, 1, self.num_experts, allow_none=True)
        check_bool("normalize", self.normalize)


def top_p_mask(probs_TE: torch.Tensor, p: float, max_active: int | None = None) -> torch.Tensor:
    """(T, E) bool: per token the smallest most-probable expert set with mass >= p, capped.

    An expert is kept when the mass of the experts ranked above it is still below p, so the expert
    that crosses p is included and the top expert is always kept. p = 1 keeps every expert (exactly,
    whatever the fp32 rounding of the partial sums).

    Args:
        probs_TE: (T, E) float32 router probabilities, rows sum to 1.
        p: threshold in (0, 1].
        max_active: optional cap on experts per token, in [1, E].
    """
    probs = probs_TE.detach()
    # Stable sort: ties are broken by expert index, identically for every batch shape.
    sorted_TE, order_TE = probs.sort(dim=-1, descending=True, stable=True)
    mass_before_TE = sorted_TE.cumsum(dim=-1) - sorted_TE
    keep_sorted_TE = mass_before_TE < p if p < 1.0 else torch.ones_like(sorted_TE, dtype=torch.bool)
    if max_active is not None:
        keep_sorted_TE[:, max_active:] = False
    return torch.zeros_like(keep_sorted_TE).scatter(-1, order_TE, keep_sorted_TE)


def router_entropy(probs_TE: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """0-d float32 mean over real tokens of H(P_t) = -sum_e P_te log P_te (the paper's dynamic loss).

    Args:
        probs_TE: (T, E) float32 router probabilities.
        mask_T: (T,) float, 1 = real token.
    """
    # entr(0) = 0, so underflowed probabilities give no NaN.
    return losses.masked_mean(torch.special.entr(probs_TE).sum(dim=-1), mask_T)


@register_router("topp", TopPConfig)
class TopPRouter(GateRouter):
    """Top-p threshold router over softmax(W x); a per-token number of experts, no budget k_l."""

    label = "top-p"

    def rule(self, logits_TE: torch.Tensor, real_T: torch.Tensor, k: torch.Tensor) -> Rule:
        """Each token's top-p expert set, weighted by P; the entropy (dynamic) loss."""
        cfg = self.config
        probs_TE = torch.softmax(logits_TE, dim=-1)
        keep_TE = top_p_mask(probs_TE, cfg.p, cfg.max_active) & real_T.unsqueeze(-1)
        weight_TE = torch.where(keep_TE, probs_TE, 0.0)
        kept_mass_T = weight_TE.sum(dim=-1, keepdim=True)
        if cfg.normalize:
            # The top expert is always kept and has P >= 1/E, so only padding rows hit the clamp.
            weight_TE = weight_TE / kept_mass_T.clamp(min=torch.finfo(weight_TE.dtype).tiny)
        mask_f = real_T.float()
        entropy = router_entropy(probs_TE, mask_f)
        stats = {"entropy": entropy, "kept_mass": losses.masked_mean(kept_mass_T.squeeze(-1), mask_f)}
        return Rule(self.to_routing(weight_TE, keep_TE), loss=cfg.entropy_coef * entropy, stats=stats)
