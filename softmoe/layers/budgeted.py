"""The global expert budget for any model: SoftMoEBudget owns the k_l of MoE layers placed anywhere.

Shape legend:
    L   budgeted MoE layers (the budget's layer axis)
    T   tokens, E routed experts

Our GPT hands each MoE layer its k_l and reads the layer's MoEOutput itself (model/decoder.py). Inside a
model whose code we do not own (a transformers Llama calls `self.mlp(hidden_states)` and expects a tensor),
`SoftMoEBudget.attach(layer)` wraps an MoELayer into a `BudgetedMoE`: it asks the budget for its k_l on
every call, returns the output tensor, and hands its aux loss and statistics to the `collect()` scope
open around the forward:

    budget = SoftMoEBudget(num_layers=4, num_experts=8, budget=2.0)
    for block in model.model.layers:
        block.mlp = budget.attach(MoELayer(64, 128, num_experts=8, router="softmoe", k=2.0))
    model.softmoe_budget = budget                       # registered once: theta trains and saves
    with budget.collect() as routing:
        out = model(input_ids=ids, labels=ids)
    (out.loss + routing.aux_loss).backward()

The scope is the one place results cross code that is not ours (as transformers' `output_router_logits`
records router outputs during a forward); nothing is stored on the layers. A training forward before the
budget's first scope warns that its aux losses are dropped (later ones outside a scope, such as an activation
checkpointing recomputation in backward, are silent). See docs/library.md.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from softmoe.common.checks import check_int
from softmoe.layers.moe import MoEOutput
from softmoe.routing.base import LayerStats, step_routers
from softmoe.routing.budget import Budget

__all__ = ["SoftMoEBudget", "BudgetedMoE", "RoutingResults"]


@dataclass
class RoutingResults:
    """What the budgeted layers returned during one `collect()` scope, in call order.

    Attributes:
        budget: the SoftMoEBudget whose layers these are.
        layers: (layer index, MoEOutput without its output tensor) per call.
    """

    budget: Budget = field(repr=False)
    layers: list[tuple[int, MoEOutput]] = field(default_factory=list)

    @property
    def aux_loss(self) -> torch.Tensor:
        """0-d float32, differentiable: the layers' aux losses plus the budget's penalty (penalty mode; 0 in
        exact mode). Add it to the training loss."""
        total = self.budget.penalty().float()
        for _, result in self.layers:
            total = total + result.aux_loss.float()
        return total

    @property
    def stats(self) -> dict[int, LayerStats]:
        """Layer index -> its detached statistics (the last call of each layer)."""
        return {index: result.stats for index, result in self.layers}

    @property
    def k_L(self) -> torch.Tensor:
        """(L,) detached per-layer k_l of the budget now."""
        return self.budget().detach()

    @property
    def router_logits(self) -> tuple[torch.Tensor, ...]:
        """One (T, E) float32 tensor per call, in call order (transformers' MoE convention)."""
        return tuple(result.router_logits for _, result in self.layers)

    def active_L(self) -> torch.Tensor:
        """(L,) float64 realized mean active experts per token of each budget layer over the scope's calls."""
        sums = torch.zeros(self.budget.num_layers, dtype=torch.float64)
        calls = torch.zeros(self.budget.num_layers, dtype=torch.float64)
        for index, result in self.layers:
            sums[index] += result.stats["active_experts_mean"].detach().double().cpu()
            calls[index] += 1
        return sums / calls.clamp(min=1)

    def after_step(self) -> None:
        """After the optimizer step: the attached routers' non-learned state (the loss-free balancing bias) moves
        from the scope's counts (`softmoe.layers.after_step`); a no-op for routers without such state."""
        step_routers((self.budget._routers[index], result.stats) for index, result in self.layers)

    def steer(self) -> None:
        """Realized-count budget (`realized=True`), after the optimizer step: move every attached layer's threshold
        so its realized count follows its k_l (`Budget.steer`). ValueError for a budget that is not realized."""
        if not self.budget.realized:
            raise ValueError("steer() needs SoftMoEBudget(..., realized=True)")
        self.budget.steer(self.budget.thresholds(), self.active_L())


class SoftMoEBudget(Budget):
    """A Budget (routing/budget.py) that hands its k_l to MoE layers inside any nn.Module.

    Args: those of Budget (num_layers, num_experts = the layers' routed experts, budget = K, k_min, margin,
    mode, learnable, penalty_coef). Register the budget once on the model (`model.softmoe_budget = budget`)
    so its theta reaches the optimizer and the state dict; the wrapped layers hold it unregistered.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._attached = 0  # layers attached so far (construction time only)
        self._routers: dict[int, nn.Module] = {}  # budget index -> attached router (for a realized budget's steer)
        self._scope: RoutingResults | None = None
        self._ever_collected = False  # a training forward before any collect() scope warns (aux loss dropped)

    def attach(self, layer: nn.Module, index: int | None = None) -> BudgetedMoE:
        """Wrap `layer` (an MoELayer with a budget router, e.g. "softmoe") as budget layer `index`.

        Args:
            layer: an MoELayer whose router takes mean_k and routes over `num_experts` experts.
            index: its position on the budget's layer axis; None = the next one (attach in model order).
        Returns:
            a BudgetedMoE to put where the model calls its FFN: forward(x) -> tensor.
        Raises:
            ValueError: the layer takes no budget, has another number of experts, or index is out of range.
        """
        if not getattr(layer, "uses_budget", False):
            raise ValueError(f"layer {type(layer).__name__} takes no budget k_l (attach MoELayers whose router "
                             "uses one, e.g. router='softmoe')")
        experts = layer.router.num_experts
        if experts != self.num_experts:
            raise ValueError(f"layer routes over {experts} experts but the budget has num_experts={self.num_experts}")
        # The budget's k_l replace the layer's own k: a layer built with another k would silently lose it.
        layer_k, budget_k = float(layer.router.config.k), float(self.budget)
        if abs(layer_k - budget_k) > 1e-9 * max(1.0, budget_k):
            raise ValueError(f"layer k={layer_k:g} differs from the budget's K={budget_k:g}: attached, the layer routes "
                             f"with the budget's k_l, never its own k; build it with k={budget_k:g}")
        if getattr(layer.router, "own_k", None) is not None:
            raise ValueError("layer has learn_k=True (its own learned k), but an attached layer routes with the "
                             "budget's k_l: build it without learn_k")
        if any(router is layer.router for router in self._routers.values()):
            raise ValueError("this layer is attached already: attach each MoE layer once (one budget layer each)")
        index = self._attached if index is None else index
        check_int("index", index)
        if not 0 <= index < self.num_layers:
            raise ValueError(f"index={index!r} must be an int in [0, num_layers={self.num_layers}); "
                             "make the budget with one layer per MoE layer of the model")
        self._attached = max(self._attached, index + 1)
        if self.realized and getattr(layer.router.config, "truncation", None) != "relative":
            raise ValueError("a realized-count budget steers the paper's relative threshold: attach layers with "
                             "truncation='relative' (the default)")
        self._routers[index] = layer.router  # not a child: the layer is registered where the host model holds it
        return BudgetedMoE(layer, self, index)

    def thresholds(self) -> list[torch.Tensor]:
        """The attached layers' relative-threshold buffers, in budget order (every layer must be attached)."""
        missing = [i for i in range(self.num_layers) if i not in self._routers]
        if missing:
            raise ValueError(f"budget layers {missing} have no attached layer (attach one per budget layer)")
        return [self._routers[i].threshold for i in range(self.num_layers)]

    @contextlib.contextmanager
    def collect(self) -> Iterator[RoutingResults]:
        """Collect every budgeted layer's aux loss and statistics for the forwards run inside the scope.

        Read the results (e.g. build the loss) before backward: with activation checkpointing the layers
        run again during backward, and a recomputation inside an open scope is recorded again.
        """
        if self._scope is not None:
            raise RuntimeError("SoftMoEBudget.collect() scopes do not nest: close the open one first")
        results = RoutingResults(self)
        self._scope, self._ever_collected = results, True
        try:
            yield results
        finally:
            self._scope = None

    def record(self, index: int, result: MoEOutput) -> bool:
        """Hand layer `index`'s result to the open collect() scope (budgeted layers call it after forward).

        Returns whether a scope was open (False: the result is dropped).
        """
        if self._scope is None:
            return False
        self._scope.layers.append((index, result._replace(output=None)))
        return True


class BudgetedMoE(nn.Module):
    """An MoELayer that takes its k_l from a SoftMoEBudget; forward(x) -> tensor (a drop-in FFN).

    Made by `SoftMoEBudget.attach`. The wrapped layer is the child `moe`; the budget is held unregistered
    (one copy, registered on the model by the user). Extra positional / keyword arguments a host model
    passes to its FFN are refused, except `attention_mask` (1 = real token), which reaches the layer.
    """

    def __init__(self, layer: nn.Module, budget: SoftMoEBudget, index: int):
        super().__init__()
        self.moe, self.index = layer, index
        object.__setattr__(self, "_budget", budget)  # not a child: saved once, where the user registers it

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        result = self.moe(x, mean_k=self._budget()[self.index], attention_mask=attention_mask)
        recorded = self._budget.record(self.index, result)
        if not (recorded or self._budget._ever_collected) and self.training and torch.is_grad_enabled():
            warnings.warn("a budgeted MoE layer ran a training forward outside `with budget.collect()`: its aux "
                          "loss (load balance, z-loss) is dropped; see docs/library.md",
                          stacklevel=4)  # the line that called this FFN (past torch.nn.Module.__call__)
        return result.output

    def extra_repr(self) -> str:
        return f"index={self.index}"
