"""Between-step controllers: routing state that is not learned by gradient, updated after each optimizer step.

Shape legend:
    E   experts
    L   MoE layers

One hook, `step`, called by the Trainer after every optimizer step with the step's counts: per MoE layer, the
routed pairs per expert and the real tokens, summed over the step's micro-batches (`RoutingCounts`, filled from
the layers' returned statistics; global under data parallelism, where the layers sum them over the processes
in their forward). Nothing is counted on a module during forward, so a forward may run twice (activation
checkpointing) without counting twice. The controllers:
    - each router class's own (`GateRouter.after_step`): the loss-free balancing bias (DeepSeek-V3,
      routing/balance.py) and ReMoE's L1 coefficient (routing/remoe.py), one lambda decision pooled over its
      layers. This module never names a router: it groups the model's routers by class and calls the hook.
    - The active-experts target (compute matching, `train.ae_target`): an integral controller that holds the
      realized mean active experts per token of a step, A (training mode, mean over MoE layers), at a target,
      in the spirit of ReMoE's lambda controller but proportional to the error (a sign step would leave the
      lever oscillating by +-rate around the point). Two levers (`train.ae_lever`):
        threshold: the paper's relative threshold, shared by every SoftMoE router,
            threshold <- clamp(threshold - rate * (target - A), 0, E). It moves the count directly: a token
            keeps the experts with p_i >= threshold * k_l / E, clamped to between 1 and m of them.
        budget: the SoftMoE budget's global K, K <- clamp(K + rate * (target - A), k_min, k_max); the learned
            per-layer shares are kept, only their total moves. Under the paper's rule K barely moves the count
            (docs/routers.md, "Nominal k and realized count"); it works for the `min_weight` truncation and for
            hard (small-alpha) routers whose p saturate.
      It holds Train AE at the target, so a SoftMoE run can be placed at the expert FLOPs of a top-k baseline;
      Infer AE (eval mode) is measured, not controlled.
    - The realized-count budget (`model.budget_options.realized: true`, routing/budget.py): per layer, the
      same integral step on that layer's own relative threshold, with the layer's k_l as its target, so each
      layer's realized Train AE follows its k_l and their mean follows K (`Budget.steer`).

The state lives in persistent buffers (`ReMoERouter.l1_coef`, `ExpertBias.bias_E`, `Budget.budget`,
`SoftKRouter.threshold`, one per router), so it is in `model.state_dict()` and a checkpoint resumes exactly.
A skipped (non-finite) step moves nothing; no config is mutated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from softmoe.common.checks import check_choice, check_float
from softmoe.routing.balance import bias_update
from softmoe.routing.base import GateRouter, step_routers
from softmoe.routing.budget import Budget, steer_threshold
from softmoe.routing.diagnostics import RoutingCounts
from softmoe.routing.remoe import multiplicative_update, pooled_sparsity

__all__ = ["multiplicative_update", "bias_update", "budget_update", "threshold_update", "pooled_sparsity",
           "ActiveExpertsTarget", "AE_LEVERS", "budget_of", "routers_of", "thresholded_routers",
           "lever_update", "realized_budget", "step"]

AE_LEVERS = ("threshold", "budget")


@dataclass(frozen=True)
class ActiveExpertsTarget:
    """The active-experts controller's settings (`train.ae_target`, `train.ae_rate`, `train.ae_lever`).

    target: the wanted realized mean active experts per token (Train AE), >= 1 (every routed token keeps one).
    rate: the lever moves by rate * (target - realized) per optimizer step, > 0 (threshold: down; K: up).
    lever: "threshold" (the relative threshold of every SoftMoE router) or "budget" (the budget's K).
    k_max: budget lever only: K stays <= k_max (None: the budget's own bound). Under the paper's rule past
        some K a larger K keeps *fewer* experts (the threshold outgrows the soft top-k's p); an integral
        controller that starts there would push K to the bound and stay. Capping K keeps it below that turn.
    """

    target: float
    rate: float
    lever: str = "threshold"
    k_max: float | None = None

    def __post_init__(self) -> None:
        check_float("ActiveExpertsTarget.target", self.target, 1.0)
        check_float("ActiveExpertsTarget.rate", self.rate, 0, open_low=True)
        check_choice("ActiveExpertsTarget.lever", self.lever, AE_LEVERS)
        if self.k_max is not None:
            check_float("ActiveExpertsTarget.k_max", self.k_max, 0, open_low=True)
            if self.lever != "budget":
                raise ValueError(f"ActiveExpertsTarget.k_max={self.k_max} bounds K, but lever={self.lever!r} "
                                 "does not move K")


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


# The active-experts controller's step on the relative threshold is the realized-count budget's, one per layer.
threshold_update = steer_threshold


def budget_of(model: nn.Module) -> Budget | None:
    """The model's one SoftMoE budget, or None; ValueError if it holds several (the controller moves one K)."""
    budgets = [m for m in model.modules() if isinstance(m, Budget)]
    if len(budgets) > 1:
        raise ValueError(f"the model holds {len(budgets)} budgets; the active-experts controller moves one")
    return budgets[0] if budgets else None


def routers_of(model: nn.Module) -> list[GateRouter]:
    """The model's routers in module order (a GPT's: block order, as DecoderOutput.routing lists its layers)."""
    return [m for m in model.modules() if isinstance(m, GateRouter)]


def thresholded_routers(model: nn.Module) -> list[GateRouter]:
    """The model's routers that truncate by a relative threshold buffer (`has_threshold`: SoftMoE's relative
    truncation), which the threshold lever and the realized-count budget move."""
    return [m for m in routers_of(model) if m.has_threshold]


def realized_budget(model: nn.Module) -> tuple[Budget, list[GateRouter]] | None:
    """The model's realized-count budget and its routers in budget order, or None when it has none.

    ValueError when the budget is realized but its layers cannot be steered (not one relative-threshold
    SoftMoE router per budget layer, as a GPT built from ModelConfig has).
    """
    budget = budget_of(model)
    if budget is None or not budget.realized:
        return None
    routers = thresholded_routers(model)
    if len(routers) != budget.num_layers:
        raise ValueError(f"model.budget_options.realized=true steers the relative threshold of each budgeted layer, "
                         f"but the model has {len(routers)} SoftMoE routers with truncation=relative for "
                         f"{budget.num_layers} budget layers")
    return budget, routers


def step(model: nn.Module, counts: RoutingCounts | None, update: bool = True,
         ae_target: ActiveExpertsTarget | None = None) -> None:
    """The after-optimizer-step hook: every controller of `model` moves from the step's counts.

    Args:
        model: any module holding routers (and optionally a SoftMoE budget); in training mode (nothing moves in
            eval mode).
        counts: the step's RoutingCounts, one entry per router of `model` in module order; None or empty: nothing
            was counted (nothing moves).
        update: False for a skipped (non-finite) step: nothing moves.
        ae_target: the active-experts controller's settings (None: the active experts are not controlled).
    """
    if not (update and model.training) or counts is None or not counts.layers:
        return
    routers = routers_of(model)
    if len(routers) != len(counts.layers):
        raise ValueError(f"step(): {len(counts.layers)} layers counted, but the model has {len(routers)} routers")
    apply_ae = lever_update(model, ae_target) if ae_target is not None else None
    realized = realized_budget(model)
    step_routers(zip(routers, counts.layers))  # each router class's own controllers (bias, ReMoE's lambda)
    with torch.no_grad():
        active_L = counts.active_L()
        if apply_ae is not None:
            apply_ae(active_L.mean())
        if realized is not None:
            budget, steered = realized
            index = {id(r): i for i, r in enumerate(routers)}
            budget.steer([r.threshold for r in steered], active_L[[index[id(r)] for r in steered]])


def lever_update(model: nn.Module, ae_target: ActiveExpertsTarget) -> Callable[[torch.Tensor], None]:
    """The active-experts controller's update for `model`: a function of the step's mean active experts that
    moves the lever in place. ValueError naming the lever when the model has none to move: the threshold lever
    needs SoftMoE routers with the relative truncation, the budget lever an exact-mode budget (and k_max
    inside its bounds)."""
    if realized_budget(model) is not None:
        raise ValueError(f"train.ae_target={ae_target.target:g} and model.budget_options.realized=true would both steer "
                         "the realized count: the realized-count budget already holds the mean over layers at "
                         f"model.k; set model.k={ae_target.target:g} and train.ae_target=0 instead")
    if ae_target.lever == "budget":
        budget = budget_of(model)
        if budget is None or budget.mode != "exact":
            raise ValueError("train.ae_lever='budget' moves the SoftMoE budget K, but this model has "
                             + ("no budget (router without learned k_l)" if budget is None else
                                f"a budget in mode {budget.mode!r}; use model.budget_options.mode=exact"))
        if ae_target.k_max is not None and not budget.k_min < ae_target.k_max <= budget.k_max:
            raise ValueError(f"train.ae_k_max={ae_target.k_max} must be in (k_min={budget.k_min}, "
                             f"E - margin={budget.k_max}]")
        high = budget.k_max if ae_target.k_max is None else ae_target.k_max

        def move_budget(mean_active: torch.Tensor) -> None:
            budget.budget.copy_(budget_update(budget.budget, mean_active, ae_target.target, ae_target.rate,
                                              budget.k_min, high))
        return move_budget
    routers = thresholded_routers(model)
    if not routers:
        raise ValueError("train.ae_lever='threshold' moves the relative threshold of SoftMoE routers, but this model "
                         "has none (model.router=softmoe with model.router_options.truncation=relative)")

    def move_threshold(mean_active: torch.Tensor) -> None:
        # one threshold for the whole model, as the target is one mean over its layers
        moved = threshold_update(routers[0].threshold, mean_active, ae_target.target, ae_target.rate,
                                 float(max(r.num_experts for r in routers)))
        for r in routers:
            r.threshold.copy_(moved)
    return move_threshold
