"""The SoftMoE router: truncated LapSum soft top-k whose mass k_l is learned under a global budget.

Shape legend:
    T   tokens
    D   d_model
    E   experts

The paper's rule (Zasada et al., ICML 2026; docs/method.md, "The paper's routing rule"), the default, per
token:
    1. r = W x in fp32 (no softmax before LapSum); in training, optionally r + gate_noise * N(0, 1) (the router
       template's `noised`, for every router).
    2. p = soft_topk(r, k_l, alpha) with alpha = 1: p_i in (0, 1), sum_i p_i = k_l. k_l comes from
       the model's Budget (the router's `k` argument) or, standalone, from this router.
    3. Truncation `relative`: tau = clamp(threshold * k_l / E, m-th largest p, largest p) with
       m = min(ceil(k_l * cap_factor), E), on detached p; keep p_i >= tau. So every token keeps
       between 1 and m experts (ties aside): an expert must hold `threshold` x the mean mass k_l / E.
    4. Combine `raw_p`: y = sum_kept p_i E_i(x), no renormalisation (kept weights sum to <= k_l).
       Gradients reach r and k_l through the kept p only.
Our earlier rule, kept for ablations (docs/routers.md): alpha = 0.1, truncation `min_weight`
(drop p_i < min_weight, optional cap `max_active`, keep at least the top expert) and combine
`mask_softmax` (w = p * softmax(r), renormalised over the kept experts). Other combine modes:
`raw_p_norm` (the kept p renormalised to sum 1: the paper's kept set at top-k's output scale, a control for
output scale vs routing), `mask_softmax_raw` (p * softmax(r), not renormalised) and `p` (p / k_l).
Routing depends on the token alone (the gate noise is training-only), so outputs are batch
invariant and causal.

`loss_free_bias=True` (DeepSeek-V3, see routing/balance.py): the per-expert bias b_E (logit units) is
added to r for *selection* only. Truncation (step 3) uses p_sel = soft_topk(r + b, k_l, alpha); the
combine weights (step 4) use the unbiased p = soft_topk(r, k_l, alpha) and softmax(r), so b moves which
experts are computed, never their weights, and gets no gradient. This costs a second threshold solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from softmoe.common import migrations
from softmoe.common.checks import check_bool, check_choice, check_float, check_int
from softmoe.ops.lapsum import soft_topk
from softmoe.routing.balance import BiasBalanceConfig, expert_bias
from softmoe.routing.base import BudgetRouter, Rule, register_router
from softmoe.routing.budget import Budget
from softmoe.routing.record import Routing, routing_from_mask, select_experts

__all__ = ["SoftKConfig", "SoftKRouter", "COMBINE_MODES", "TRUNCATIONS", "combine_weights", "relative_keep",
           "soft_routing"]

COMBINE_MODES = ("raw_p", "raw_p_norm", "mask_softmax", "mask_softmax_raw", "p")
TRUNCATIONS = ("relative", "min_weight")


@dataclass(frozen=True)
class SoftKConfig(BiasBalanceConfig):
    alpha: float = 1.0  # Laplace scale of the soft top-k on raw logits; smaller is harder (paper: 1.0)
    learn_alpha: bool = False  # learn alpha (as log alpha) by gradient
    truncation: str = "relative"  # "relative" (paper) or "min_weight" (our earlier rule)
    threshold: float = 1.8  # relative: keep p_i >= threshold * k / E, clamped to [m-th largest p, largest p]
    cap_factor: float = 2.0  # relative: at most m = min(ceil(k * cap_factor), E) experts (paper's hard_threshold_coeff)
    min_weight: float = 0.05  # min_weight truncation: experts with p < min_weight are not computed
    max_active: int | None = None  # optional hard cap on experts per token (either truncation)
    combine: str = "raw_p"  # combine weights, one of COMBINE_MODES (paper: raw_p)
    learn_k: bool = False  # standalone layer only: learn k in [k_min, E - margin], penalised towards k
    k_min: float = 1.0  # standalone learn_k: lower bound of k
    margin: float = 0.5  # standalone learn_k: upper bound E - margin
    k_penalty_coef: float = 1.0  # standalone learn_k: weight of (k_learned - k)^2 in aux_loss

    def __post_init__(self) -> None:
        super().__post_init__()
        # alpha is used in float32: below its smallest normal number it would underflow to 0.
        check_float("alpha", self.alpha, 1.2e-38, 1e30)
        check_choice("truncation", self.truncation, TRUNCATIONS)
        check_float("threshold", self.threshold, 0.0)
        check_float("cap_factor", self.cap_factor, 0.0, open_low=True)
        check_float("min_weight", self.min_weight, 0.0, 1.0)
        check_float("k_penalty_coef", self.k_penalty_coef, 0.0)
        check_int("max_active", self.max_active, 1, self.num_experts, allow_none=True)
        check_choice("combine", self.combine, COMBINE_MODES)
        for name in ("learn_alpha", "learn_k"):
            check_bool(name, getattr(self, name))

    @classmethod
    def check_k(cls, k: float, num_experts: int) -> None:
        """k in (0, E): soft top-k needs room below E (E = 1 allows only k = 1, the single expert)."""
        if num_experts == 1:
            if k != 1:
                raise ValueError(f"k={k} must be 1 for router='softmoe' with num_experts=1")
        elif not 0 < k < num_experts:
            raise ValueError(f"k={k} must be in (0, num_experts={num_experts}) for router='softmoe'")


def relative_keep(p_TE: torch.Tensor, k: torch.Tensor, threshold: float | torch.Tensor,
                  cap_factor: float) -> torch.Tensor:
    """(T, E) bool experts kept by the paper's relative, clamped threshold (computed on detached p).

    tau = clamp(threshold * k / E, lower = m-th largest p, upper = largest p), m = min(ceil(k c), E);
    keep p_i >= tau. Hence 1 <= kept <= m per token (more only with ties at tau).

    Args:
        p_TE: (T, E) soft top-k probabilities, rows sum to k.
        k: 0-d or (T, 1) the layer's k_l.
        threshold: the relative threshold (paper: 1.8), a float or a 0-d tensor.
        cap_factor: c in m = min(ceil(k c), E) (paper: 2.0).
    """
    num_experts = p_TE.shape[-1]
    p = p_TE.detach()
    k = k.detach().to(p.dtype)
    if k.dim() == 0:
        k = k.expand(p.shape[0], 1)
    m_T1 = torch.ceil(k * cap_factor).clamp(1, num_experts).long()
    p_desc = p.sort(dim=-1, descending=True).values
    tau_T1 = torch.clamp(threshold * k / num_experts, min=p_desc.gather(-1, m_T1 - 1), max=p_desc[:, :1])
    return p >= tau_T1


def combine_weights(
    p_TE: torch.Tensor, logits_TE: torch.Tensor, keep_TE: torch.Tensor, k: torch.Tensor, mode: str
) -> torch.Tensor:
    """(T, E) float32 combine weights from soft top-k probabilities (see the module docstring).

    Args:
        p_TE: (T, E) soft top-k inclusion probabilities, rows sum to k.
        logits_TE: (T, E) float32 router scores.
        keep_TE: (T, E) bool kept pairs (only kept entries are used downstream).
        k: 0-d (or (T, 1)) the soft top-k mass k_l.
        mode: one of COMBINE_MODES.
    """
    if mode == "raw_p":
        return p_TE
    if mode == "p":
        return p_TE / k
    if mode == "raw_p_norm":  # the kept p renormalised to sum 1 (the paper's rule at top-k's output scale)
        kept_TE = torch.where(keep_TE, p_TE, 0.0)
        return kept_TE / kept_TE.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(p_TE.dtype).tiny)
    w_TE = p_TE * torch.softmax(logits_TE, dim=-1)
    if mode == "mask_softmax_raw":
        return w_TE
    w_TE = torch.where(keep_TE, w_TE, 0.0)
    # The kept top expert has p >= k/E and softmax >= 1/E, so the sum is > 0 for every routed token;
    # the clamp only guards unrouted (padding) rows.
    return w_TE / w_TE.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(w_TE.dtype).tiny)


def _default_threshold(module: "SoftKRouter", state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a state dict from before the `threshold` buffer gets the config's value."""
    migrations.router_state(state_dict, prefix, module.config.threshold)


@register_router("softmoe", SoftKConfig)
class SoftKRouter(BudgetRouter):
    """Truncated LapSum soft top-k router; k_l from the budget (`k`) or its own k.

    Standalone (k=None) the layer is a one-layer budget: k fixed at `config.k`, or with
    `learn_k=True` a learned k in [k_min, E - margin] with penalty k_penalty_coef (k - config.k)^2.
    """

    label = "SoftMoE"
    marker = "o"

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
        # The relative threshold in use: config.threshold, unless the active-experts controller
        # (`train.ae_target` with `train.ae_lever=threshold`) moves it between steps. A persistent buffer,
        # so a checkpoint resumes it exactly; checkpoints written before it existed load with config.threshold.
        self.register_buffer("threshold", torch.tensor(config.threshold, dtype=torch.float32))
        self.register_load_state_dict_pre_hook(_default_threshold)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    @property
    def has_threshold(self) -> bool:
        """Whether the rule truncates by the relative `threshold` buffer (what the count controllers move)."""
        return self.config.truncation == "relative" and self.num_experts > 1

    def standalone_k(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's k without a budget: the learned own k and its penalty, or the config's k."""
        if self.own_k is not None:
            return self.own_k()[0], self.own_k.penalty()
        return self.fixed_k(device), None

    def rule(self, logits_TE: torch.Tensor, real_T: torch.Tensor, k: torch.Tensor) -> Rule:
        """Truncated soft top-k of the scores (in training noised by the template's `gate_noise`)."""
        selection_p_TE = self._selection_p(logits_TE, k)
        routing, stats = soft_routing(logits_TE, k, self.alpha, self.config, real_T, selection_p_TE, self.threshold)
        return Rule(routing, stats=stats)

    def _selection_p(self, logits_TE: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """(T, E) soft_topk(r + b) that decides truncation with the loss-free bias; None without it."""
        if self.balance is None or self.num_experts == 1:
            return None
        with torch.no_grad():  # selection only: no gradient through the biased solve
            return soft_topk(self.balance.shift(logits_TE), k, self.alpha)


def soft_routing(logits_TE: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, config: SoftKConfig,
                 real_T: torch.Tensor, selection_p_TE: torch.Tensor | None = None,
                 threshold: torch.Tensor | None = None) -> tuple[Routing, dict]:
    """The SoftMoE rule on given router scores: soft top-k -> truncation -> combine weights.

    Shared by SoftKRouter and the retrofitted transformers blocks (softmoe/convert), which bring their own gate.

    Args:
        logits_TE: (T, E) float32 router scores r.
        k: 0-d (or (T, 1)) tensor, the layer's k_l in (0, E).
        alpha: 0-d tensor, the Laplace scale.
        config: the rule's settings (truncation, threshold, cap_factor, min_weight, max_active, combine).
        real_T: (T,) bool, True for real tokens; padding is not routed.
        selection_p_TE: optional (T, E) probabilities that decide truncation instead of p (loss-free bias).
        threshold: optional 0-d tensor, the relative threshold in use (SoftKRouter's `threshold` buffer, which
            the active-experts controller may move); None: `config.threshold`.
    Returns:
        (routing, extra): the routing to dispatch and the 0-d stats `alpha`, `kept_mass` (mass of p kept) and,
        for the relative truncation, `threshold` (the one used).
    """
    if logits_TE.shape[-1] == 1:
        p_TE = torch.ones_like(logits_TE)  # the only expert is always fully active
    else:
        p_TE = soft_topk(logits_TE, k, alpha)
    select_TE = p_TE if selection_p_TE is None else selection_p_TE
    extra = {"alpha": alpha}
    if config.truncation == "relative" and logits_TE.shape[-1] > 1:
        used = (torch.full((), config.threshold, dtype=torch.float32, device=logits_TE.device) if threshold is None
                else threshold.detach().clone())
        extra["threshold"] = used  # a copy: the controller moves the buffer in place after the step
        keep_TE = relative_keep(select_TE, k, used, config.cap_factor)
        if config.max_active is not None:
            keep_TE &= select_experts(select_TE, 0.0, config.max_active)
    else:
        keep_TE = select_experts(select_TE, config.min_weight, config.max_active)
    keep_TE = keep_TE & real_T.unsqueeze(-1)
    weight_TE = combine_weights(p_TE, logits_TE, keep_TE, k, config.combine)
    kept_mass = (p_TE * keep_TE).sum(-1).sum() / real_T.sum().clamp(min=1)
    routing = routing_from_mask(weight_TE, keep_TE, config.max_pairs(logits_TE.shape[0]))
    return routing, {**extra, "kept_mass": kept_mass}
