"""Expert-choice router (Zhou et al. 2022): each expert picks its top-C tokens. NOT CAUSAL.

Shape legend:
    T   tokens of the forward call (flattened batch x sequence)
    D   d_model
    E   experts
    G   groups, P positions per group (G * P >= T; the tail of the last group is empty)

Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing" (NeurIPS 2022, arXiv 2202.09368).
Per group of tokens (the whole forward call, or consecutive runs of `group_size` flattened tokens):
    1. P = softmax(W x) over the E experts, in fp32 (token-wise, as in the paper).
    2. Capacity C = max(1, floor(capacity_factor * T_g * k / E + 0.5)), capped at T_g, where T_g is the
       number of REAL (non-padding) tokens of the group: each expert processes C tokens, so the group
       does E * C ~= capacity_factor * k * T_g expert evaluations (k experts per token on average).
    3. Every expert keeps the C real tokens of the group with the largest P[:, e] (ties: lower token
       index first). Padding is never picked and does not count towards T_g.
    4. Combine weight of a kept pair = the token's softmax probability P[t, e] (not renormalised).
A token may get 0..E experts; a token no expert picks gets zero FFN output (the residual carries it).
Load is balanced by construction, so the balance loss is ~constant; the z-loss still applies.

NOT CAUSAL: a token's experts depend on the scores of every other token of its group, later positions
included. Training with it lets the future leak into the routing, and incremental (KV-cache) decoding
would route differently from the full forward, so `ExpertChoiceRouter.causal = False` and the model
refuses cached decoding with it (`GPT.new_cache`). It is here only as a flagged reference point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softmoe.common.checks import check_float, check_int
from softmoe.routing import losses
from softmoe.routing.base import GateRouter, RouterConfig, Rule, register_router

__all__ = ["ExpertChoiceConfig", "ExpertChoiceRouter", "expert_capacity", "expert_choice_mask"]


@dataclass(frozen=True)
class ExpertChoiceConfig(RouterConfig):
    """Expert-choice config. `k` is the mean experts per token the capacity provides, in (0, E]."""

    capacity_factor: float = 1.0  # scales C; the paper's "capacity factor" c is capacity_factor * k
    group_size: int | None = None  # tokens per routing group (flattened order); None = the whole call

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("capacity_factor", self.capacity_factor, 0.0, open_low=True)
        check_int("group_size", self.group_size, 1, allow_none=True)

    def nominal_active_experts(self) -> float:
        """capacity_factor * k experts per token (exact up to rounding of C and the cap C <= T_g)."""
        return min(float(self.num_experts), self.capacity_factor * float(self.k))


def expert_capacity(real_G: torch.Tensor, k: float, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """(G,) int64 tokens each expert picks per group: clamp(floor(cf * T_g * k / E + 0.5), 1, T_g).

    Args:
        real_G: (G,) int64 real tokens per group (T_g).
        k, num_experts, capacity_factor: see ExpertChoiceConfig.
    """
    wanted_G = torch.floor(real_G.double() * (capacity_factor * k / num_experts) + 0.5).long()
    return torch.minimum(wanted_G.clamp(min=1), real_G)


def expert_choice_mask(score_TE: torch.Tensor, real_T: torch.Tensor, k: float, capacity_factor: float,
                       group_size: int | None) -> torch.Tensor:
    """(T, E) bool: the (token, expert) pairs kept when each expert picks its top-C tokens per group.

    Args:
        score_TE: (T, E) float selection scores (softmax probabilities).
        real_T: (T,) bool, True for real tokens; padding is never picked and does not count in T_g.
        k, capacity_factor: see ExpertChoiceConfig.
        group_size: P, tokens per group in flattened order (None: one group of all T tokens).
    """
    num_tokens, num_experts = score_TE.shape
    if num_tokens == 0:
        return torch.zeros_like(score_TE, dtype=torch.bool)
    size = num_tokens if group_size is None else group_size
    num_groups = max(1, -(-num_tokens // size))
    tail = num_groups * size - num_tokens  # empty positions that complete the last group
    # Padding (and the empty tail) scores -inf: sorted after every real token, never within C.
    score = torch.where(real_T.unsqueeze(-1), score_TE.detach(), float("-inf"))
    score_GPE = torch.nn.functional.pad(score, (0, 0, 0, tail), value=float("-inf")).view(num_groups, size, -1)
    real_GP = torch.nn.functional.pad(real_T, (0, tail)).view(num_groups, size)
    capacity_G = expert_capacity(real_GP.sum(dim=1), k, num_experts, capacity_factor)
    # rank of each token within its group for each expert (0 = highest score; stable: ties by position)
    order_GPE = score_GPE.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(size, device=score.device).view(1, size, 1).expand_as(order_GPE)
    rank_GPE = torch.empty_like(order_GPE).scatter_(1, order_GPE, positions)
    keep_GPE = (rank_GPE < capacity_G.view(-1, 1, 1)) & real_GP.unsqueeze(-1)
    return keep_GPE.reshape(num_groups * size, num_experts)[:num_tokens]


@register_router("expert_choice", ExpertChoiceConfig)
class ExpertChoiceRouter(GateRouter):
    """Experts pick their top-C tokens of softmax(W x) per group. NON-CAUSAL (`causal = False`):
    a token's output depends on the other tokens of its group, so it is neither batch invariant nor
    usable for KV-cache decoding. Fixed k (`uses_budget = False`)."""

    label = "expert choice"
    causal = False
    fixed_active_experts = True

    def fixed_k(self, device: torch.device) -> torch.Tensor:
        """The capacity's experts per token, capacity_factor * k (reported as stats["k"])."""
        return torch.tensor(self.config.nominal_active_experts(), device=device)

    def rule(self, logits_TE: torch.Tensor, real_T: torch.Tensor, k: torch.Tensor) -> Rule:
        """Every expert keeps its top-C real tokens of each group (the whole call: x_TD is the flattened
        batch), weighted by P."""
        cfg = self.config
        probs_TE = torch.softmax(logits_TE, dim=-1)
        keep_TE = expert_choice_mask(probs_TE, real_T, float(cfg.k), cfg.capacity_factor, cfg.group_size)
        active_T = keep_TE.sum(dim=-1).float()
        stats = {"zero_expert_fraction": losses.masked_mean((active_T == 0).float(), real_T.float())}
        return Rule(self.to_routing(probs_TE, keep_TE), stats=stats)
