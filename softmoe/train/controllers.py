"""Between-step controllers: routing state that is not learned by gradient, updated after each optimizer step.

Shape legend:
    E   experts

Three controllers, one hook (`step`, called by the Trainer after every optimizer step):
    - ReMoE's L1 coefficient (Wang et al., ICLR 2025, sec. 3.2): lambda <- lambda * factor^sign(target - S),
      with S the sparsity pooled over every ReMoE layer and micro-batch of the step, target = 1 - k/E.
    - DeepSeek-V3's loss-free balancing bias (arXiv 2412.19437, sec. 2.1.2), per layer:
      b_e <- b_e + u * sign(mean load - load_e).
    - The active-experts target (compute matching, `train.ae_target`): an integral controller on the
      SoftMoE budget's global K, K <- clamp(K + rate * (target - A), k_min, k_max), with A the realized
      mean active experts per token of the step (training mode, mean over MoE layers and micro-batches,
      summed over processes). The learned per-layer shares are kept; only their total moves. In the
      spirit of ReMoE's lambda controller, but proportional to the error (a sign step would leave K
      oscillating by +-rate around the point). It holds Train AE at the target, so a SoftMoE run can be
      placed at the expert FLOPs of a top-k baseline; Infer AE (eval mode) is measured, not controlled.

The state lives in persistent buffers (`ReMoERouter.l1_coef`, `ExpertBias.bias_E`, `Budget.budget`), so
it is in `model.state_dict()` and a checkpoint resumes exactly; the routers count what the controllers
read (routed pairs, expert load) in non-persistent buffers, in training mode only, and the Trainer hands
the step's realized active experts to `step` as a return value of its forward passes. No config is
mutated. The update rules are pure functions of tensors; `step` only finds the modules and applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from softmoe.common.checks import check_float
from softmoe.routing.balance import ExpertBias
from softmoe.routing.budget import Budget
from softmoe.routing.remoe import ReMoERouter

__all__ = ["multiplicative_update", "bias_update", "budget_update", "pooled_sparsity", "ActiveExpertsTarget",
           "budget_of", "step"]


@dataclass(frozen=True)
class ActiveExpertsTarget:
    """The active-experts controller's settings (`train.ae_target`, `train.ae_rate`).

    target: the wanted realized mean active experts per token (Train AE), > 0.
    rate: K moves by rate * (target - realized) per optimizer step, > 0.
    k_max: K stays <= k_max (None: the budget's own bound). The paper's rule keeps p_i >= 1.8 k / E, so
        past some K a larger K keeps *fewer* experts (the threshold outgrows the soft top-k's p); an
        integral controller that starts there (a flat, untrained router keeps one expert at any K) would
        push K to the bound and stay. Capping K below that turn keeps it on the increasing side.
    """

    target: float
    rate: float
    k_max: float | None = None

    def __post_init__(self) -> None:
        for name in ("target", "rate"):
            check_float(f"ActiveExpertsTarget.{name}", getattr(self, name), 0, open_low=True)
        if self.k_max is not None:
            check_float("ActiveExpertsTarget.k_max", self.k_max, 0, open_low=True)


def multiplicative_update(coef: torch.Tensor, sparsity: torch.Tensor, target: float, factor: float) -> torch.Tensor:
    """ReMoE's controller: coef * factor if sparsity < target, coef / factor if above, unchanged if equal.

    Args:
        coef: 0-d float lambda.
        sparsity: 0-d float measured fraction of zero entries.
        target: wanted sparsity, 1 - k/E.
        factor: alpha > 1 (paper: 1.2).
    """
    return coef * factor ** torch.sign(target - sparsity).to(coef.dtype)


def bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's loss-free balancing step: (E,) bias + rate * sign(mean load - load).

    Under-loaded experts (load below the mean) gain `rate`, over-loaded ones lose it.

    Args:
        bias_E: (E,) float32 selection bias.
        load_E: (E,) int64 or float routed pairs per expert since the last update.
        rate: u > 0.
    """
    load = load_E.to(torch.float64)
    return bias_E + rate * torch.sign(load.mean() - load).to(bias_E.dtype)


def budget_update(budget: torch.Tensor, active: torch.Tensor, target: float, rate: float, low: float,
                  high: float) -> torch.Tensor:
    """The active-experts controller: clamp(K + rate * (target - active), low, high).

    Args:
        budget: 0-d float K (the Budget's `budget` buffer).
        active: 0-d float realized mean active experts per token of the step.
        target: wanted realized mean active experts.
        rate: step size (K units per expert of error).
        low, high: the Budget's k_min and k_max (the controller saturates there, it never leaves them).
    Returns:
        0-d tensor of budget's dtype.
    """
    moved = budget.double() + rate * (target - active.double())
    return moved.clamp(low, high).to(budget.dtype)


def budget_of(model: nn.Module) -> Budget | None:
    """The model's one SoftMoE budget, or None; ValueError if it holds several (the controller moves one K)."""
    budgets = [m for m in model.modules() if isinstance(m, Budget)]
    if len(budgets) > 1:
        raise ValueError(f"the model holds {len(budgets)} budgets; the active-experts controller moves one")
    return budgets[0] if budgets else None


def pooled_sparsity(routers: list[ReMoERouter]) -> torch.Tensor | None:
    """0-d float64 fraction of zero (token, expert) entries over all routers' counts; None if they saw nothing."""
    entries = sum(int(r.entries) for r in routers)
    if entries == 0:
        return None
    routed = sum(int(r.routed_pairs) for r in routers)
    return torch.tensor(1.0 - routed / entries, dtype=torch.float64)


def _update_l1_coefs(routers: list[ReMoERouter]) -> None:
    sparsity = pooled_sparsity(routers)
    if sparsity is None:
        return
    # One decision for the whole model (the paper's S_i averages all layers); every model built from
    # ModelConfig gives its layers the same k/E, and the mean covers standalone mixes.
    target = sum(r.config.target_sparsity for r in routers) / len(routers)
    for r in routers:
        r.l1_coef.copy_(multiplicative_update(r.l1_coef, sparsity, target, r.config.lambda_factor))


def _sum_counts(remoe: list[ReMoERouter], biases: list[ExpertBias],
                reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every router's step counts by their sum over processes (one collective for all of them)."""
    counts = [t.view(-1) for r in remoe for t in (r.routed_pairs, r.entries)] + [b.load_E for b in biases]
    if not counts:
        return
    total = reduce_sum(torch.cat(counts))
    for t, part in zip(counts, total.split([c.numel() for c in counts])):
        t.copy_(part)


def step(model: nn.Module, update: bool = True,
         reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
         ae_target: ActiveExpertsTarget | None = None, active: torch.Tensor | None = None) -> None:
    """The after-optimizer-step hook: update every controller of `model`, then clear the step's counts.

    Args:
        model: any module holding ReMoE routers, loss-free biases and/or a SoftMoE budget (a no-op without).
        update: False for a skipped (non-finite) step: the counts are dropped, the state is kept.
            Nothing is updated in eval mode either (evaluation never moves the state).
        reduce_sum: data parallel: sums a count tensor over the processes, so every rank updates from
            the global batch's counts and the controller state stays identical across ranks.
        ae_target: the active-experts controller's settings (None: K is not controlled).
        active: with `ae_target`: (2,) float64 [sum over the step's micro-batches of their realized mean
            active experts per token (mean over MoE layers), number of micro-batches], this process's.
    """
    remoe = [m for m in model.modules() if isinstance(m, ReMoERouter)]
    biases = [m for m in model.modules() if isinstance(m, ExpertBias)]
    budget = budget_of(model) if ae_target is not None else None
    if ae_target is not None and (budget is None or active is None):
        raise ValueError("step(ae_target=...) needs a model with a SoftMoE budget and the step's `active` counts")
    with torch.no_grad():
        if update and model.training:
            if reduce_sum is not None:
                _sum_counts(remoe, biases, reduce_sum)
                active = None if active is None else reduce_sum(active)  # ranks hold equal tokens per micro-batch
            if remoe:
                _update_l1_coefs(remoe)
            for b in biases:
                b.bias_E.copy_(bias_update(b.bias_E, b.load_E, b.rate))
            if budget is not None and float(active[1]) > 0:
                mean_active = active[0] / active[1]
                high = budget.k_max if ae_target.k_max is None else min(ae_target.k_max, budget.k_max)
                budget.budget.copy_(budget_update(budget.budget, mean_active, ae_target.target, ae_target.rate,
                                                  budget.k_min, high))
        for r in remoe:
            r.routed_pairs.zero_()
            r.entries.zero_()
        for b in biases:
            b.load_E.zero_()
