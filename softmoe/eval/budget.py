"""The budget dial: evaluate one trained SoftMoE model at several global budgets K', no retraining.

Shape legend:
    L   SoftMoE layers (the Budget's layer axis)

At each K' the per-layer budgets are the learned allocation scaled proportionally,
    k_l' = clip(c * k_l, k_min, k_max)   with c such that mean_l k_l' = K' exactly,
so a layer that is capped hands its overflow to the others in proportion to their learned k_l (and a
layer lifted to k_min takes its deficit from them). Without clipping c = K'/K. The values are pinned
with `Budget.set_budget(K', per_layer=...)`, which checks the bounds and the mean again; the model's
own budget state is restored after each evaluation.

Under the paper's rule K' sets the soft mass, not the count (routing/budget.py): the realized count barely
moves. A model trained with the realized-count budget (`budget_options.realized`) holds counts instead: at each
K' its layers' thresholds are recalibrated (`calibrate_thresholds`, eval mode, on calibration batches of the
training split) so that each layer's realized count equals its k_l', and the dial then moves compute.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from softmoe.common.checks import check_float, check_int
from softmoe.common.precision import autocast_context, module_device
from softmoe.data import eval_batches
from softmoe.eval.flops import compute_cost
from softmoe.eval.perplexity import bits_per_byte, evaluate_split
from softmoe.eval.plots import pyplot, save_figure, style_axes
from softmoe.model import GPT
from softmoe.routing.diagnostics import RoutingCounts
from softmoe.train.controllers import realized_budget

__all__ = ["BudgetPoint", "active_per_layer", "budget_sweep", "calibrate_thresholds", "calibration_batches", "check_budgets", "dialed",
           "plot_budget_sweep", "scaled_allocation"]

CALIBRATION_ROUNDS = 16  # bisection rounds: the threshold to E / 2^16 (far below a count step)


@dataclass(frozen=True)
class BudgetPoint:
    """The model evaluated at one global budget."""

    budget: float  # K' = mean_l k_l'
    k_L: list[float]  # the pinned per-layer k_l'
    loss: float  # nats per token
    tokens: int  # scored targets
    bits_per_byte: float | None  # None when the byte count is unknown
    active_experts_mean: float  # realized, mean over layers
    active_experts_per_layer: list[float]  # realized, by layer
    expert_flops_per_token: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


def scaled_allocation(k_L: torch.Tensor, budget: float, k_min: float, k_max: float) -> torch.Tensor:
    """Scale a learned allocation to a new mean: k_l' = clip(c k_l, k_min, k_max), mean_l k_l' = budget.

    mean_l clip(c k_l, ...) is continuous and non-decreasing in c, so c is found by bisection and then
    solved exactly on the layers left unclipped.

    Args:
        k_L: (L,) positive learned per-layer k_l.
        budget: K' in [k_min, k_max].
    Returns:
        (L,) float64 k_l' in [k_min, k_max] with mean K' (to float64 rounding).
    """
    if not k_min <= budget <= k_max:
        raise ValueError(f"budget={budget} must be in [k_min={k_min}, k_max={k_max}]")
    k_L = k_L.detach().double()
    if bool((k_L <= 0).any()):
        raise ValueError(f"k_L={k_L.tolist()} must be positive to be scaled")
    target = budget * k_L.shape[0]
    low, high = 0.0, k_max / float(k_L.min())  # mean at c=low is k_min, at c=high k_max
    for _ in range(200):
        mid = 0.5 * (low + high)
        if float((mid * k_L).clamp(k_min, k_max).sum()) < target:
            low = mid
        else:
            high = mid
    c = 0.5 * (low + high)
    free_L = (c * k_L > k_min) & (c * k_L < k_max)
    if bool(free_L.any()):  # solve c exactly for the unclipped layers
        pinned = (c * k_L).clamp(k_min, k_max)[~free_L].sum()
        c = float((target - pinned) / k_L[free_L].sum())
    return (c * k_L).clamp(k_min, k_max)


def check_budgets(model: GPT, budgets: Sequence[float]) -> None:
    """ValueError unless `model` has a SoftMoE budget and every K' in `budgets` lies in its bounds."""
    if model.budget is None:
        c = model.config
        raise ValueError(f"budget dial needs a SoftMoE checkpoint with a budget; this model has ffn={c.ffn!r}, "
                         f"router={c.router!r}")
    if not budgets:
        raise ValueError("budgets=[] must list at least one global budget")
    low, high = model.budget.k_min, model.budget.k_max
    for value in budgets:
        check_float("budget", value)
        if not low <= value <= high:
            raise ValueError(f"budget={value} is out of range: this model's budget allows [k_min={low}, "
                             f"E - margin={high}]")


def calibration_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int = 2
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `num_batches` evaluation batches of `tokens` (the training split's, for `calibrate_thresholds`)."""
    check_int("num_batches", num_batches, 1)
    batches = []
    for idx_BT, targets_BT in eval_batches(tokens, seq_len, batch_size):
        batches.append((idx_BT, targets_BT))
        if len(batches) == num_batches:
            break
    if not batches:
        raise ValueError(f"calibration tokens ({tokens.shape[0]}) make no batch of seq_len={seq_len}")
    return batches


@torch.no_grad()
def active_per_layer(model: GPT, batches, precision: str = "fp32") -> torch.Tensor:
    """(L,) float64 realized mean active experts per token of every MoE layer over `batches` (routed pairs / real
    tokens), in the model's current mode (eval here; training mode for eval/noise.py)."""
    device = module_device(model)
    counts = RoutingCounts()
    for idx_BT, _ in batches:
        with autocast_context(precision, device):
            counts.add(model(idx_BT.to(device)).routing)
    return counts.active_L()


@torch.no_grad()
def calibrate_thresholds(model: GPT, batches, precision: str = "fp32",
                         rounds: int = CALIBRATION_ROUNDS) -> torch.Tensor:
    """Set every layer's relative threshold so that its eval-mode realized count on `batches` equals its k_l.

    Joint bisection on [0, E] per layer (the count falls as the threshold rises; a layer's input depends on the
    earlier layers' thresholds only weakly, and they settle first). Each layer keeps the threshold whose
    count was nearest its k_l. The model's mode is restored.

    Args:
        model: a GPT with a realized-count budget (ValueError otherwise).
        batches: (idx_BT, targets_BT) calibration batches (targets unused).
    Returns:
        (L,) float64 the realized counts at the chosen thresholds.
    """
    found = realized_budget(model)
    if found is None:
        raise ValueError("calibrate_thresholds needs a model trained with model.budget_options.realized=true")
    budget, routers = found
    was_training = model.training
    model.eval()
    target_L = budget().detach().double().cpu()
    low_L = torch.zeros_like(target_L)
    high_L = torch.full_like(target_L, float(budget.num_experts))
    best_L, best_err_L, best_count_L = low_L.clone(), torch.full_like(target_L, math.inf), target_L.clone()
    try:
        for _ in range(rounds):
            mid_L = 0.5 * (low_L + high_L)
            for router, value in zip(routers, mid_L):
                router.threshold.fill_(float(value))
            count_L = active_per_layer(model, batches, precision).cpu()
            err_L = (count_L - target_L).abs()
            better = err_L < best_err_L
            best_L = torch.where(better, mid_L, best_L)
            best_count_L = torch.where(better, count_L, best_count_L)
            best_err_L = torch.minimum(err_L, best_err_L)
            too_many = count_L > target_L  # raise the threshold
            low_L = torch.where(too_many, mid_L, low_L)
            high_L = torch.where(too_many, high_L, mid_L)
        for router, value in zip(routers, best_L):
            router.threshold.fill_(float(value))
    finally:
        model.train(was_training)
    return best_count_L


@contextlib.contextmanager
def dialed(model: GPT, budget: float, calibration=None, precision: str = "fp32") -> Iterator[torch.Tensor]:
    """Pin the model's per-layer budgets to the learned allocation scaled to `budget`; restore on exit.

    A model with a realized-count budget also has its thresholds recalibrated to the new k_l' on `calibration`
    batches (required then; see `calibrate_thresholds`) and restored on exit.

    Yields:
        (L,) float32 k_l' in use.
    """
    check_budgets(model, [budget])
    b = model.budget
    realized = realized_budget(model)
    if realized is not None and calibration is None:
        raise ValueError("this model was trained with model.budget_options.realized=true: dialing its budget needs "
                         "calibration batches (its thresholds are recalibrated to the new k_l)")
    routers = [] if realized is None else realized[1]
    saved = {name: buffer.clone() for name, buffer in b.named_buffers()}
    saved_thresholds = [r.threshold.clone() for r in routers]
    with torch.no_grad():
        k_L = scaled_allocation(b.k(), budget, b.k_min, b.k_max)
    try:
        b.set_budget(float(budget), per_layer=k_L.float())
        if realized is not None:
            calibrate_thresholds(model, calibration, precision)
        yield b.k()
    finally:
        for name, buffer in b.named_buffers():
            buffer.copy_(saved[name])
        for router, value in zip(routers, saved_thresholds):
            router.threshold.copy_(value)


def budget_sweep(model: GPT, tokens: np.ndarray, seq_len: int, budgets: Sequence[float], batch_size: int = 16,
                 precision: str = "fp32", max_batches: int | None = None,
                 num_bytes: int | None = None, progress: bool = False,
                 calibration_tokens: np.ndarray | None = None) -> list[BudgetPoint]:
    """Evaluate `model` on one split at each global budget K' (see the module docstring).

    Args:
        model: a SoftMoE decoder (ValueError otherwise).
        tokens: (N,) token ids of the split.
        seq_len, batch_size, precision, max_batches: as in `evaluate_split`.
        budgets: the K' values, each in the Budget's [k_min, E - margin].
        num_bytes: UTF-8 bytes of the split's text, for bits per byte (whole splits only).
        progress: a progress bar per budget (on a terminal).
        calibration_tokens: token ids (of the training split) whose first batches recalibrate the thresholds of a
            realized-count budget at each K'; required for such a model, unused otherwise.
    Returns:
        One BudgetPoint per K', in the given order.
    """
    check_budgets(model, budgets)
    calibration = None
    if realized_budget(model) is not None:
        if calibration_tokens is None:
            raise ValueError("budget_sweep of a model with a realized-count budget needs calibration_tokens")
        calibration = calibration_batches(calibration_tokens, seq_len, batch_size)
    points = []
    for i, budget in enumerate(budgets):
        with dialed(model, budget, calibration, precision) as k_L:
            result = evaluate_split(model, tokens, seq_len, batch_size, precision, max_batches, progress=progress,
                                    desc=f"budget dial {i + 1}/{len(budgets)}: K'={budget:g}")
            cost = compute_cost(model, result.layers)
        bpb = None
        if num_bytes and max_batches is None:
            bpb = bits_per_byte(result.loss, result.tokens, num_bytes)
        points.append(BudgetPoint(
            budget=float(budget), k_L=[round(v, 6) for v in k_L.tolist()], loss=result.loss, tokens=result.tokens,
            bits_per_byte=bpb, active_experts_mean=float(result.active_experts_mean),
            active_experts_per_layer=[layer.active_mean for layer in result.layers],
            expert_flops_per_token=cost.expert_flops_per_token,
        ))
    return points


def plot_budget_sweep(points: Sequence[BudgetPoint], path: Path, trained_budget: float | None = None,
                      title: str = "Budget dial") -> Path:
    """PNG of loss against realized mean active experts, one labelled point per K'."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [p.active_experts_mean for p in points]
    ys = [p.loss for p in points]
    ax.plot(xs, ys, marker="o", color="C0")
    for p in points:
        trained = trained_budget is not None and abs(p.budget - trained_budget) < 1e-9
        ax.annotate(f"K'={p.budget:g}" + (" (trained)" if trained else ""), (p.active_experts_mean, p.loss),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    style_axes(ax, "realized active experts per token, AE (mean over layers)", "cross-entropy (nats / token)", title,
               legend_size=0)
    return save_figure(fig, path)
