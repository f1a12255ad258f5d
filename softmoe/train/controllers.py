"""Between-step controllers: routing state that is not learned by gradient, updated after each optimizer step.

Shape legend:
    E   experts

Four controllers, one hook (`step`, called by the Trainer after every optimizer step):
    - ReMoE's L1 coefficient (Wang et al., ICLR 2025, sec. 3.2): lambda <- lambda * factor^sign(target - S),
      with S the sparsity pooled over every ReMoE layer and micro-batch of the step, target = 1 - k/E.
    - DeepSeek-V3's loss-free balancing bias (arXiv 2412.19437, sec. 2.1.2), per layer:
      b_e <- b_e + u * sign(mean load - load_e).
    - The active-experts target (compute matching, `train.ae_target`): an integral controller that holds the
      realized mean active experts per token of a step, A (training mode, mean over MoE layers and
      micro-batches, summed over processes), at a target, in the spirit of ReMoE's lambda controller but
      proportional to the error (a sign step would leave the lever oscillating by +-rate around the point).
      Two levers (`train.ae_lever`):
        threshold: the paper's relative threshold, shared by every SoftMoE router,
            threshold <- clamp(threshold - rate * (target - A), 0, E). It moves the count directly: a token
            keeps the experts with p_i >= threshold * k_l / E, clamped to between 1 and m of them.
        budget: the SoftMoE budget's global K, K <- clamp(K + rate * (target - A), k_min, k_max); the learned
            per-layer shares are kept, only their total moves. Under the paper's rule K barely moves the count:
            while a token's p_i < 1/2, LapSum's p scale with k exactly as the threshold k * threshold / E does,
            so the kept set does not change (benchmarks/dial_diagnosis.py); it works for the `min_weight`
            truncation and for hard (small-alpha) routers whose p saturate.
      It holds Train AE at the target, so a SoftMoE run can be placed at the expert FLOPs of a top-k baseline;
      Infer AE (eval mode) is measured, not controlled.
    - The realized-count budget (`model.budget_options.realized: true`, routing/budget.py): per layer, the
      same integral step on that layer's own relative threshold, with the layer's k_l as its target, so each
      layer's realized Train AE follows its k_l and their mean follows K (`Budget.steer`).

The state lives in persistent buffers (`ReMoERouter.l1_coef`, `ExpertBias.bias_E`, `Budget.budget`,
`SoftKRouter.threshold`, one per router), so
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

from softmoe.common.checks import check_choice, check_float
from softmoe.routing.balance import ExpertBias
from softmoe.routing.budget import Budget, steer_threshold
from softmoe.routing.remoe import ReMoERouter
from softmoe.routing.softk import SoftKRouter

__all__ = ["multiplicative_update", "bias_update", "budget_update", "threshold_update", "pooled_sparsity",
           "ActiveExpertsTarget", "AE_LEVERS", "budget_of", "thresholded_routers", "lever_update", "realized_budget",
           "step"]

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


def threshold_update(threshold: torch.Tensor, active: torch.Tensor, target: float, rate: float,
                     high: float) -> torch.Tensor:
    """The active-experts controller on the relative threshold: clamp(threshold - rate * (target - active), 0, high)
    (`routing.budget.steer_threshold`, which the realized-count budget applies per layer)."""
    return steer_threshold(threshold, active, target, rate, high)


def budget_of(model: nn.Module) -> Budget | None:
    """The model's one SoftMoE budget, or None; ValueError if it holds several (the controller moves one K)."""
    budgets = [m for m in model.modules() if isinstance(m, Budget)]
    if len(budgets) > 1:
        raise ValueError(f"the model holds {len(budgets)} budgets; the active-experts controller moves one")
    return budgets[0] if budgets else None


def thresholded_routers(model: nn.Module) -> list[SoftKRouter]:
    """The model's SoftMoE routers that truncate by the paper's relative threshold (the threshold lever's)."""
    return [m for m in model.modules()
            if isinstance(m, SoftKRouter) and m.config.truncation == "relative" and m.num_experts > 1]


def realized_budget(model: nn.Module) -> tuple[Budget, list[SoftKRouter]] | None:
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
        model: any module holding ReMoE routers, loss-free biases, SoftMoE routers and/or a SoftMoE budget
            (a no-op without).
        update: False for a skipped (non-finite) step: the counts are dropped, the state is kept.
            Nothing is updated in eval mode either (evaluation never moves the state).
        reduce_sum: data parallel: sums a count tensor over the processes, so every rank updates from
            the global batch's counts and the controller state stays identical across ranks.
        ae_target: the active-experts controller's settings (None: the active experts are not controlled).
        active: with `ae_target` or a realized-count budget: (L + 1,) float64, this process's sums over the
            step's micro-batches of each MoE layer's realized mean active experts per token (training mode), then
            the number of micro-batches. (A (2,) tensor is one sum, e.g. of the mean over layers.)
    """
    remoe = [m for m in model.modules() if isinstance(m, ReMoERouter)]
    biases = [m for m in model.modules() if isinstance(m, ExpertBias)]
    realized = realized_budget(model)
    if (ae_target is not None or realized is not None) and active is None:
        raise ValueError("step() with ae_target or a realized-count budget needs the step's `active` counts")
    if realized is not None and active.shape[0] != realized[0].num_layers + 1:
        raise ValueError(f"step(): `active` has {active.shape[0]} entries, expected one per budget layer "
                         f"({realized[0].num_layers}) plus the micro-batch count")
    apply_ae = lever_update(model, ae_target) if ae_target is not None else None
    with torch.no_grad():
        if update and model.training:
            if reduce_sum is not None:
                _sum_counts(remoe, biases, reduce_sum)
                active = None if active is None else reduce_sum(active)  # ranks hold equal tokens per micro-batch
            if remoe:
                _update_l1_coefs(remoe)
            for b in biases:
                b.bias_E.copy_(bias_update(b.bias_E, b.load_E, b.rate))
            if apply_ae is not None and float(active[-1]) > 0:
                apply_ae(active[:-1].mean() / active[-1])
            if realized is not None:  # no host sync: a step always has >= 1 micro-batch
                budget, routers = realized
                budget.steer([r.threshold for r in routers], active[:-1] / active[-1].clamp(min=1))
        for r in remoe:
            r.routed_pairs.zero_()
            r.entries.zero_()
        for b in biases:
            b.load_E.zero_()


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
