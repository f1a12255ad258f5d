"""The global expert budget: owns every SoftMoE layer's k_l, the soft top-k mass of layer l.

Shape legend:
    L   SoftMoE layers

The model calls `budget.k()` once per forward and hands layer l its k_l (a 0-d tensor). Gradients
of the task loss reach k_l through the soft top-k and move allocation between layers.

Nominal k and realized count. k_l is the soft top-k's mass (sum_i p_i = k_l), the paper's parameterisation
of "mean active experts". Under the paper's rule it is not the realized count: while every p_i < 1/2 the kept
set does not depend on k_l at all (p and the threshold 1.8 k_l / E both scale with k_l); the logit spread,
E and the cap set the count (docs/routers.md). With `realized=True` the budget is held in realized counts:
after every optimizer step each layer's relative threshold is steered (`steer_threshold`, no gradient) so the
layer's realized active experts per token follow its k_l, and the mean over layers follows K. The learned
allocation and the budget dial then move compute.

Modes:
    exact    k_l = k_min + L (K - k_min) softmax(theta)_l, then any excess above k_max = E - margin
             is redistributed over the other layers in proportion to their shares. mean_l k_l == K
             and k_min <= k_l <= k_max hold for every theta, so after any optimizer step too.
    penalty  k_l = k_min + (k_max - k_min) sigmoid(theta_l), free within the bounds;
             `penalty()` = penalty_coef * (mean_l k_l - K)^2 is added to the training loss.
The budget dial: `set_budget(K)` moves the budget of a trained model (keeping its learned shares),
`set_budget(K, per_layer=[...])` pins explicit per-layer values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from softmoe.common.checks import check_bool, check_choice, check_float, check_int, check_known

__all__ = ["Budget", "BudgetOptions", "BUDGET_MODES", "budget_options", "exact_allocation", "steer_threshold"]

BUDGET_MODES = ("exact", "penalty")


def exact_allocation(share_L: torch.Tensor, budget: float | torch.Tensor, k_min: float, k_max: float) -> torch.Tensor:
    """Split L * (budget - k_min) over layers by `share_L`, capping each layer at k_max.

    Water-filling: layers that would exceed the cap are pinned to it and their excess is shared by
    the rest in proportion to share_L, until no layer exceeds the cap: L rounds, no host sync (a
    round after the last cap changes nothing). `budget` may be a float or a 0-d tensor.

    Args:
        share_L: (L,) non-negative shares summing to 1 (softmax(theta)); gradients flow through.
        budget: K with k_min <= K <= k_max.
    Returns:
        k_L: (L,) with mean exactly K (to rounding) and every entry in [k_min, k_max].
    """
    num_layers = share_L.shape[0]
    free = num_layers * (budget - k_min)  # mass above k_min to distribute
    room = k_max - k_min
    capped_L = torch.zeros_like(share_L, dtype=torch.bool)
    extra_L = share_L * free
    for _ in range(num_layers):
        open_share_L = torch.where(capped_L, 0.0, share_L)
        rest = free - room * capped_L.sum()
        scale = rest / open_share_L.sum().clamp(min=torch.finfo(share_L.dtype).tiny)
        extra_L = torch.where(capped_L, torch.full_like(share_L, room), open_share_L * scale)
        capped_L = capped_L | (extra_L > room)
    return k_min + extra_L.clamp(max=room)


def steer_threshold(threshold: torch.Tensor, active: torch.Tensor, target: torch.Tensor | float, rate: float,
                    high: float) -> torch.Tensor:
    """One integral-controller step on a relative threshold: clamp(threshold - rate * (target - active), 0, high).

    Too few active experts lower the threshold (more experts pass it), too many raise it. At 0 every token keeps
    its cap m; at high = E no expert passes (tau = threshold * k / E >= k >= 1 > p_i for k >= 1) and every token
    keeps its top expert: the bounds span the whole range the rule allows. Works elementwise, so (L,) thresholds
    follow (L,) targets in one call.

    Args:
        threshold: float thresholds in use (0-d or (L,)).
        active: realized mean active experts per token, same shape (or broadcastable).
        target: wanted realized counts (a float, or a tensor like `active`).
        rate: step size (threshold units per expert of error), > 0.
        high: the upper bound (the number of experts).
    Returns:
        a tensor of threshold's shape and dtype.
    """
    target = torch.as_tensor(target, dtype=torch.float64, device=threshold.device)
    moved = threshold.double() - rate * (target - active.double())
    return moved.clamp(0.0, high).to(threshold.dtype)


@dataclass(frozen=True)
class BudgetOptions:
    """The budget's settings (`ModelConfig.budget_options`), typed and checked when built; the number of experts
    bounds k_min and margin, checked by `Budget`.

    Attributes:
        k_min: lower bound of every k_l (> 0).
        margin: k_l <= E - margin (> 0; soft top-k needs k < E).
        mode: "exact" (default, mean k_l == K always) or "penalty".
        learnable: whether theta is trained (False = uniform k_l = K, fixed).
        penalty_coef: weight of (mean k_l - K)^2 in penalty mode.
        realized: hold the budget in realized counts (module docstring): the training loop steers each
            layer's relative threshold after every step so its realized active experts follow k_l.
        realized_rate: that controller's step, threshold units per expert of error (> 0).
    """

    k_min: float = 1.0
    margin: float = 0.5
    mode: str = "exact"
    learnable: bool = True
    penalty_coef: float = 1.0
    realized: bool = False
    realized_rate: float = 0.1

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, BUDGET_MODES)
        check_bool("learnable", self.learnable)
        check_float("margin", self.margin, 0.0, open_low=True)
        check_float("k_min", self.k_min, 0.0, open_low=True)
        check_float("penalty_coef", self.penalty_coef, 0.0)
        check_bool("realized", self.realized)
        check_float("realized_rate", self.realized_rate, 0.0, open_low=True)


def budget_options(**values) -> BudgetOptions:
    """`BudgetOptions(**values)`; ValueError naming an option the budget does not have, and its value."""
    check_known("model.budget_options", values, [f.name for f in fields(BudgetOptions)])
    return BudgetOptions(**values)


class Budget(nn.Module):
    """Per-layer soft top-k mass k_l under a global budget K = mean_l k_l.

    Args:
        num_layers: L, the number of SoftMoE layers.
        num_experts: E per layer.
        budget: K = mean_l k_l (soft mass; realized count with `realized`), in [k_min, E - margin].
        options: the settings (`BudgetOptions`); or give them as keywords (`Budget(L, E, K, mode="penalty")`).
    """

    def __init__(self, num_layers: int, num_experts: int, budget: float, options: BudgetOptions | None = None,
                 **values):
        super().__init__()
        if options is not None and values:
            raise ValueError(f"give the budget's options as `options` or as keywords, not both (got {sorted(values)})")
        options = budget_options(**values) if options is None else options
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts)):
            check_int(name, value, 1)
        check_float("margin", options.margin, 0.0, num_experts, open_low=True)
        check_float("k_min", options.k_min, 0.0, num_experts - options.margin, open_low=True)
        self.options = options
        self.realized, self.realized_rate = options.realized, float(options.realized_rate)
        self.num_layers, self.num_experts, self.mode = num_layers, num_experts, options.mode
        self.k_min, self.k_max = float(options.k_min), float(num_experts - options.margin)
        self.penalty_coef = float(options.penalty_coef)
        self._check_budget(budget)
        self.register_buffer("budget", torch.tensor(float(budget)))
        # Pinned per-layer values from set_budget(K, per_layer=...); `pinned` says whether they apply.
        self.register_buffer("pinned", torch.tensor(False))
        self.register_buffer("pinned_k_L", torch.zeros(num_layers))
        self.theta = nn.Parameter(self._initial_theta(budget), requires_grad=options.learnable)
        self._pinned_read: tuple[tuple[int, int], bool] | None = None  # ((id, version) of `pinned`, its value)

    @property
    def is_pinned(self) -> bool:
        """The buffer `pinned` as a bool, read from the device only after it changed (a host sync then).

        A buffer written in place (set_budget, load_state_dict, copy_) bumps its version counter; a new
        buffer (`.to(device)`) has a new id. Every forward of a training run reads the cached value.
        """
        if self.pinned.is_inference():  # a buffer made under inference_mode has no version counter
            return bool(self.pinned)
        key = (id(self.pinned), self.pinned._version)
        if self._pinned_read is None or self._pinned_read[0] != key:
            self._pinned_read = (key, bool(self.pinned))
        return self._pinned_read[1]

    def _check_budget(self, budget) -> None:
        low, high = self.k_min, self.k_max
        if self.mode == "penalty":
            check_float("budget", budget, low, high)
            if not low < budget < high:
                raise ValueError(f"budget={budget} must be strictly inside (k_min={low}, E - margin={high}) "
                                 f"in penalty mode")
        else:
            check_float("budget", budget, low, high)

    def _initial_theta(self, budget: float) -> torch.Tensor:
        """theta giving k_l = K for every layer."""
        if self.mode == "exact":
            return torch.zeros(self.num_layers)
        fraction = (budget - self.k_min) / (self.k_max - self.k_min)
        return torch.full((self.num_layers,), math.log(fraction / (1.0 - fraction)))

    def forward(self) -> torch.Tensor:
        """(L,) float32 per-layer k_l (differentiable in theta unless pinned or frozen).

        Under torch.compile tracing the pin is a select on the device (a pinned forward then gives theta a
        zero gradient instead of none).
        """
        if torch.compiler.is_compiling():
            return torch.where(self.pinned, self.pinned_k_L, self._free_k())
        if self.is_pinned:
            return self.pinned_k_L.clone()
        return self._free_k()

    def _free_k(self) -> torch.Tensor:
        """(L,) float32 k_l from theta."""
        # float64 so mean_l k_l == K holds to float32 rounding after the cast.
        theta = self.theta.double()
        if self.mode == "exact":
            k_L = exact_allocation(torch.softmax(theta, dim=0), self.budget.double(), self.k_min, self.k_max)
        else:
            k_L = self.k_min + (self.k_max - self.k_min) * torch.sigmoid(theta)
        return k_L.float()

    def k(self) -> torch.Tensor:
        """Alias of forward(): (L,) per-layer k_l."""
        return self()

    def penalty(self) -> torch.Tensor:
        """0-d penalty_coef * (mean k_l - K)^2 in penalty mode; 0 in exact mode or when pinned."""
        if self.mode == "exact":
            return self.theta.new_zeros(())
        if torch.compiler.is_compiling():
            return torch.where(self.pinned, 0.0, self.penalty_coef * (self().mean() - self.budget).square())
        if self.is_pinned:
            return self.theta.new_zeros(())
        return self.penalty_coef * (self().mean() - self.budget).square()

    def freeze(self) -> None:
        """Stop learning the allocation (theta gets no gradient)."""
        self.theta.requires_grad_(False)

    def set_budget(self, budget: float, per_layer: Sequence[float] | torch.Tensor | None = None) -> None:
        """The budget dial: a new global K for inference or fine-tuning.

        Without `per_layer`, the learned shares are kept and rescaled to the new K (exact mode), or
        the penalty target moves to K (penalty mode). With `per_layer`, the L values are pinned as
        given; their mean must equal K (within 1e-5) and each lie in [k_min, E - margin].
        """
        self._check_budget(budget)
        self.budget.fill_(float(budget))
        if per_layer is None:
            self.pinned.fill_(False)
            return
        k_L = torch.as_tensor(per_layer, dtype=torch.float32).flatten()
        if k_L.shape[0] != self.num_layers:
            raise ValueError(f"per_layer has {k_L.shape[0]} values, expected num_layers={self.num_layers}")
        for i, value in enumerate(k_L.tolist()):
            check_float(f"per_layer[{i}]", value, self.k_min, self.k_max)
        if abs(k_L.double().mean().item() - budget) > 1e-5:
            raise ValueError(f"per_layer has mean {k_L.double().mean().item():.6g}, expected budget={budget}")
        self.pinned_k_L.copy_(k_L)
        self.pinned.fill_(True)

    def steer(self, thresholds: Sequence[torch.Tensor], active_L: torch.Tensor) -> None:
        """Realized mode, after an optimizer step: move layer l's threshold buffer so its count follows k_l.

        Args:
            thresholds: the L routers' `threshold` buffers, in budget order (moved in place).
            active_L: (L,) realized mean active experts per token of the step, per layer (training mode).
        """
        if len(thresholds) != self.num_layers:
            raise ValueError(f"steer got {len(thresholds)} thresholds, expected num_layers={self.num_layers}")
        with torch.no_grad():
            target_L = self().detach()
            stacked = torch.stack([t.detach() for t in thresholds])
            moved = steer_threshold(stacked, active_L.to(stacked.device), target_L, self.realized_rate,
                                    float(self.num_experts))
            for t, value in zip(thresholds, moved):
                t.copy_(value)

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_experts={self.num_experts}, budget={float(self.budget)}, "
                f"k_min={self.k_min}, k_max={self.k_max}, mode={self.mode!r}, realized={self.realized}")
