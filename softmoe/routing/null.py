"""Null-expert router (AdaMoE): top-k over E real experts plus `num_null` null experts.

Shape legend:
    T   tokens
    D   d_model
    E   real experts
    S   gate slots, E + num_null (real experts first, null experts last)

Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language
Models" (arXiv 2406.13233, Findings of EMNLP 2024). A null expert outputs zero and costs no FLOPs, so
a token whose top-k holds j null picks uses only k - j real experts. Per token:
    1. P = softmax(W x) over all S slots, in fp32 (one gate of S rows).
    2. Keep the k most probable slots. Null picks are dropped from the Routing: they add no pair, no
       dispatch and no FLOPs. A token whose k picks are all null gets exactly zero FFN output.
    3. Combine weights. `normalize=True` (the default for k > 1): the kept real probabilities renormalised to sum to
       1 among the kept real experts only, as in the authors' released Mixtral code (AdaMoE builds on
       Mixtral's renormalised top-k). The null picks therefore do not shrink the output of the real
       experts; they only remove experts. `normalize=False`: the raw probabilities P (the mass on null
       picks is simply lost, Switch/GShard style), the default for k = 1: a renormalised single kept weight
       is always 1, so the gate would learn nothing from the loss.
    4. aux_loss = lb_coef * the null-aware balance loss (`null_balance_loss`) + z_coef * the z-loss
       over all S logits.
Routing depends on the token alone, so outputs are batch invariant and causal.

Budget: with balanced slots each token uses k * E / (E + num_null) real experts on average; that is
the number to match against SoftMoE's mean_k (e.g. E = 8, k = 4, num_null = 8 gives 2). The realised
count is `stats["active_experts_mean"]` (real experts only: null picks are not routed pairs).
`RouterOutput.logits_TE` holds all S = E + num_null columns for this router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softmoe.common.checks import check_bool, check_int
from softmoe.routing import losses
from softmoe.routing.base import GateRouter, RouterConfig, Rule, register_router

__all__ = ["NullConfig", "NullRouter", "null_balance_loss"]


@dataclass(frozen=True)
class NullConfig(RouterConfig):
    """Null-expert router config. `k` is the integer top-k over all E + num_null slots (real and null)."""

    num_null: int = 1  # number of null experts (zero output, no FLOPs), >= 1
    # renormalise kept real probabilities among kept real experts (AdaMoE code); None: True for k > 1,
    # False for k = 1 (a renormalised single weight is always 1: the gate would learn nothing from the loss)
    normalize: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_null", self.num_null, 1)
        if self.normalize is None:
            object.__setattr__(self, "normalize", self.k > 1)
        check_bool("normalize", self.normalize)

    @classmethod
    def check_k(cls, k: float, num_experts: int) -> None:
        """k is a whole number of slots in [1, E]."""
        if float(k) != int(k):
            raise ValueError(f"k={k} must be an integer in [1, num_experts={num_experts}] for router='null'")

    def nominal_active_experts(self) -> float:
        """Real experts per token at uniform load over the slots: k * E / (E + num_null) (nominal)."""
        return float(self.k) * self.num_experts / (self.num_experts + self.num_null)


def null_balance_loss(
    picks_S: torch.Tensor, probs_TS: torch.Tensor, mask_T: torch.Tensor, num_null: int
) -> torch.Tensor:
    """AdaMoE's null-aware Switch balance loss S * sum_s f_s * P_s, null experts as one group.

    f_s is slot s's share of all top-k picks of real tokens (null picks included), P_s the mean router
    probability of s over real tokens. The null experts are interchangeable, so balancing them against
    each other is pointless: each null slot's f is replaced by the mean f of the null group (AdaMoE
    modifies exactly the null entries of the per-expert load). Since sum_null f_mean * P_s =
    f_mean * sum_null P_s, this balances the group's total probability against its total load, which
    pushes the average null usage towards k * num_null / S per token (AdaMoE: the loss "ensures the
    average usage of the null experts"). Equals 1 at perfect balance. Only P carries gradient.

    Args:
        picks_S: (S,) int64 top-k picks per slot over real tokens (real experts first, nulls last).
        probs_TS: (T, S) float32 router probabilities over all slots.
        mask_T: (T,) float, 1 = real token.
        num_null: number of null slots at the end of S.
    Returns:
        0-d float32 loss.
    """
    load_S = losses.expert_load(picks_S)
    null_mean = load_S[-num_null:].mean()
    load_S = torch.cat([load_S[:-num_null], null_mean.expand(num_null)])
    num_slots = probs_TS.shape[-1]
    return num_slots * (load_S * losses.masked_mean(probs_TS, mask_T)).sum()


@register_router("null", NullConfig)
class NullRouter(GateRouter):
    """Top-k over E real + num_null null experts; null picks are dropped (fewer real experts, no FLOPs)."""

    label = "null experts"

    def __init__(self, d_model: int, config: NullConfig):
        super().__init__(d_model, config)
        # One gate over all slots: rows [0, E) score the real experts, rows [E, E + num_null) the nulls.
        # (It replaces the template's E-row gate, whose init draw is kept so a seed gives the same model.)
        self.gate = torch.nn.Linear(d_model, config.num_experts + config.num_null, bias=False)

    def rule(self, logits_TS: torch.Tensor, real_T: torch.Tensor, k: torch.Tensor) -> Rule:
        """The real experts among the k most probable of all S slots, with the null-aware balance loss.

        The z-loss (template) reads all S logits; `RouterOutput.logits_TE` holds all S columns.
        """
        cfg = self.config
        num_real = cfg.num_experts
        probs_TS = torch.softmax(logits_TS, dim=-1)
        top_idx_TK = probs_TS.detach().topk(int(cfg.k), dim=-1).indices
        pick_TS = torch.zeros_like(probs_TS, dtype=torch.bool).scatter(-1, top_idx_TK, True)
        pick_TS = pick_TS & real_T.unsqueeze(-1)
        keep_TE = pick_TS[:, :num_real]
        weight_TE = torch.where(keep_TE, probs_TS[:, :num_real], 0.0)
        if cfg.normalize:
            # Tokens with no real pick have an all-zero row; the clamp keeps it zero instead of NaN.
            kept_mass_T1 = weight_TE.sum(dim=-1, keepdim=True)
            weight_TE = weight_TE / kept_mass_T1.clamp(min=torch.finfo(weight_TE.dtype).tiny)
        mask_f = real_T.float()
        balance = null_balance_loss(losses.global_sum(pick_TS.sum(dim=0)), probs_TS, mask_f, cfg.num_null)
        null_picks_T = pick_TS[:, num_real:].sum(dim=-1).float()
        stats = {
            "null_fraction": losses.masked_mean(null_picks_T, mask_f) / float(cfg.k),
            "zero_expert_fraction": losses.masked_mean((null_picks_T == cfg.k).float(), mask_f),
        }
        return Rule(self.to_routing(weight_TE, keep_TE), stats=stats, balance_loss=balance)
