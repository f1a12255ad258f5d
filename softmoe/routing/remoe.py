"""ReMoE router: ReLU gates, a variable number of experts per token, an adaptive load-weighted L1 penalty.

Shape legend:
    T   tokens
    D   d_model
    E   experts

Wang et al., ICLR 2025, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing" (arXiv 2412.14711).
Per token:
    1. w = ReLU(W x), in fp32 (`router_logits`).
    2. Every expert with w_e > 0 is routed (optionally only the `max_active` largest). A token may get
       no expert at all: its FFN output is exactly zero.
    3. Combine with the raw ReLU weights w (no normalisation, as in the paper).
    4. aux_loss = lambda * L_reg (+ the shared balance/z terms, off by default: ReMoE balances through
       L_reg), with the paper's load-balanced L1 (sec. 3.3):
           L_reg = sum_e f_e * mean_t w_te,   f_e = E / (k T) * #{t : expert e routed for t}
       over real tokens; f carries no gradient. At perfect balance (k experts per token, spread evenly)
       f_e = 1 and L_reg is the plain L1 mean.

lambda is not a constant. `ReMoERouter.after_step` (called by `softmoe.train.controllers.step`) updates it
after every optimizer step (paper sec. 3.2): lambda <- lambda * factor^sign(target - S), with S the sparsity
(fraction of zero (token, expert) entries over real tokens) pooled over all ReMoE layers and the step's
micro-batches, target = 1 - k/E, factor = 1.2, starting at lambda_init = 1e-8. lambda is a persistent buffer
(`l1_coef`, in the state_dict: exact resume); the pair counts reach the update as the layers' returned
statistics (`expert_counts`, `real_tokens`), so nothing is counted on the module and evaluation never moves
lambda.

Layer sum vs mean: the paper averages L_reg over the L layers; the decoder sums each layer's aux
loss (as for every other router), so our lambda is the paper's lambda / L. The controller is
multiplicative, so this only shifts lambda's trajectory by log_1.2(L) steps.
With `max_active`, sparsity and f count the routed pairs (what is computed), not every w_e > 0.
Routing depends on the token alone, so outputs are batch invariant and causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softmoe.common.checks import check_float, check_int
from softmoe.routing import losses
from softmoe.routing.base import GateRouter, RouterConfig, Rule, register_router
from softmoe.routing.record import select_experts

__all__ = ["ReMoEConfig", "ReMoERouter", "relu_l1_loss", "multiplicative_update", "pooled_sparsity"]


@dataclass(frozen=True)
class ReMoEConfig(RouterConfig):
    """ReMoE config. `k` is the budget: the controller drives the sparsity to 1 - k/E (k in (0, E])."""

    lb_coef: float = 0.0  # Switch balance loss off: ReMoE balances through its load-weighted L1 (paper)
    z_coef: float = 0.0  # z-loss off: the L1 term already keeps the ReLU gates small
    lambda_init: float = 1e-8  # initial L1 coefficient lambda (paper: 1e-8)
    lambda_factor: float = 1.2  # multiplicative controller step alpha > 1 (paper: 1.2)
    max_active: int | None = None  # optional cap on experts per token, in [1, E]; None = no cap (paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("lambda_init", self.lambda_init, 0.0, open_low=True)
        check_float("lambda_factor", self.lambda_factor, 1.0, open_low=True)
        check_int("max_active", self.max_active, 1, self.num_experts, allow_none=True)

    @property
    def target_sparsity(self) -> float:
        """1 - k/E: the fraction of zero (token, expert) entries the controller aims for."""
        return 1.0 - float(self.k) / self.num_experts


def relu_l1_loss(weight_TE: torch.Tensor, routed_TE: torch.Tensor, mask_T: torch.Tensor, k: float) -> torch.Tensor:
    """ReMoE's load-balanced L1 of one layer: sum_e f_e * mean_t w_te, f_e = E/(k T) * #routed tokens of e.

    Args:
        weight_TE: (T, E) float32 ReLU gate outputs (carry the gradient).
        routed_TE: (T, E) bool routed pairs (f has no gradient).
        mask_T: (T,) float, 1 = real token; means are over real tokens.
        k: the layer's budget.
    f is counted over the global batch inside `losses.global_counts` (data parallel).
    Returns:
        0-d float32 loss.
    """
    num_experts = weight_TE.shape[-1]
    # masked_mean's sums, taken over the global batch under data parallelism (`losses.global_sum`).
    routed_E = losses.global_sum((routed_TE.float() * mask_T.unsqueeze(-1)).sum(0))
    f_E = num_experts / float(k) * routed_E / losses.global_sum(mask_T.sum()).clamp(min=1.0)
    return (f_E * losses.masked_mean(weight_TE, mask_T)).sum()


def multiplicative_update(coef: torch.Tensor, sparsity: torch.Tensor, target: float, factor: float) -> torch.Tensor:
    """ReMoE's controller: coef * factor if sparsity < target, coef / factor if above, unchanged if equal.

    Args:
        coef: 0-d float lambda.
        sparsity: 0-d float measured fraction of zero entries.
        target: wanted sparsity, 1 - k/E.
        factor: alpha > 1 (paper: 1.2).
    """
    return coef * factor ** torch.sign(target - sparsity.to(torch.float64)).to(coef.dtype)


def pooled_sparsity(layers: list[tuple[GateRouter, dict]]) -> torch.Tensor | None:
    """0-d float64 fraction of zero (token, expert) entries over every layer's step counts; None if they saw no
    token. `layers`: (router, counts with `expert_counts` (E,) and `real_tokens`) pairs."""
    routed = sum(counts["expert_counts"].double().sum() for _, counts in layers)
    entries = sum(counts["real_tokens"].double() * router.num_experts for router, counts in layers)
    if float(entries) == 0:
        return None
    return 1.0 - routed / entries


@register_router("remoe", ReMoEConfig)
class ReMoERouter(GateRouter):
    """ReLU router with an adaptive L1 penalty; lambda is a buffer moved by `after_step` between steps.

    Buffers:
        l1_coef: 0-d float32 lambda (persistent).
    """

    label = "ReMoE"

    def __init__(self, d_model: int, config: ReMoEConfig):
        super().__init__(d_model, config)
        self.register_buffer("l1_coef", torch.tensor(float(config.lambda_init)))

    @classmethod
    def after_step(cls, layers: list[tuple[GateRouter, dict]]) -> None:
        """One lambda decision for every ReMoE layer (the paper's S averages all layers): the sparsity pooled over
        their step counts against the mean of their targets 1 - k/E."""
        super().after_step(layers)
        sparsity = pooled_sparsity(layers)
        if sparsity is None:
            return
        target = sum(router.config.target_sparsity for router, _ in layers) / len(layers)
        with torch.no_grad():
            for router, _ in layers:
                router.l1_coef.copy_(multiplicative_update(router.l1_coef, sparsity, target,
                                                           router.config.lambda_factor))

    def rule(self, logits_TE: torch.Tensor, real_T: torch.Tensor, k: torch.Tensor) -> Rule:
        """Every expert whose ReLU gate is positive (the `max_active` largest if capped), weighted by the
        gate; the load-balanced L1 times lambda."""
        cfg = self.config
        weight_TE = torch.relu(logits_TE)
        # select_experts applies the cap (and always adds the top expert); `> 0` then drops zero gates,
        # so a token whose gates are all zero is routed nowhere.
        routed_TE = select_experts(weight_TE, 0.0, cfg.max_active) & (weight_TE > 0) & real_T.unsqueeze(-1)
        routing = self.to_routing(weight_TE, routed_TE)
        mask_f = real_T.float()
        reg = relu_l1_loss(weight_TE, routed_TE, mask_f, cfg.k)
        # A copy: the controller updates the buffer in place, which must not touch this step's graph or stats.
        l1_coef = self.l1_coef.clone()
        stats = {
            "l1_coef": l1_coef,
            "l1_reg": reg,
            "sparsity": 1.0 - losses.masked_mean(routed_TE.float().mean(dim=-1), mask_f),
            "zero_expert_fraction": losses.masked_mean((~routed_TE.any(dim=-1)).float(), mask_f),
        }
        return Rule(routing, loss=l1_coef * reg, stats=stats)
