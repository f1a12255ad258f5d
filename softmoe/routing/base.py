"""The router template: config base, output, statistics, the shared routing steps and the registry.

Shape legend:
    T   tokens
    D   d_model
    E   experts

Every router routes T tokens in the same steps, and only one of them is its own:
    1. the padding mask (`real_tokens`): padding is never routed and is left out of losses and stats;
    2. fp32 router scores W x (`router_logits`), padding rows zeroed, NaN/inf refused; in training, plus the
       config's `gate_noise` (`noised`: the rule routes on the noised scores, the losses read the clean ones);
    3. the layer's k as a 0-d tensor: the router's fixed k, or for a router that uses the global budget
       (`BudgetRouter`) the k_l the model passes (`router(x_TD, mask_T, k)`, the one call signature);
    4. THE RULE (`rule`, the router's only method): scores -> the one ragged `Routing` record, plus any
       router-specific loss and statistics (`Rule`);
    5. finish (`finish_routing`): Switch load balance and z-loss into `aux_loss`, the shared statistics.
Steps 1-3 and 5 live in `GateRouter.route`. Adding a router is one file: a frozen config dataclass
(subclass of `RouterConfig`) and a `GateRouter` (or `BudgetRouter`) subclass with a `rule`, decorated with
`@register_router("name", ConfigClass)` and imported in `softmoe/routing/__init__.py` (docs/routers.md).
Code outside this package never tests a router's name: it asks the class (`router_class(name)`) for
`uses_budget`, `causal`, `label`, `describe(k, E)`, ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from softmoe.common.checks import check_float, check_int, check_known
from softmoe.ops.checks import all_finite, value_checks_enabled
from softmoe.routing import diagnostics, losses
from softmoe.routing.record import Routing, routing_from_mask

__all__ = [
    "RouterConfig",
    "RouterOptions",
    "RouterOutput",
    "LayerStats",
    "Rule",
    "GateRouter",
    "BudgetRouter",
    "ROUTERS",
    "register_router",
    "router_class",
    "build_router",
    "router_config",
    "router_options",
    "router_logits",
    "finish_routing",
    "real_tokens",
    "step_routers",
]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """Fields every router has. Subclasses add theirs and extend `__post_init__`."""

    num_experts: int  # E
    k: float  # experts per token (top-k); the soft top-k mass k (SoftMoE: nominal, not the realized count)
    lb_coef: float = 0.01  # weight of the Switch load-balancing loss in aux_loss (Fedus et al. 2021)
    z_coef: float = 1e-3  # weight of the router z-loss in aux_loss (Zoph et al. 2022)
    # Static dispatch size: None (default) routes exactly N pairs (one host sync per layer on a GPU); an int
    # cap in [1, E] sizes every routing at N_max = T * cap pairs, padded, with no sync (record.py). Routing
    # more than N_max pairs is an error, so cap must bound the experts a token can keep (top-k: k; the
    # paper's rule: ceil(k_l * cap_factor)).
    dispatch_cap: int | None = None
    # Training only: std of N(0, 1) noise added to the fp32 router logits before the rule (the paper's "small noise
    # on the gate pre-activations", on every routed model); the losses read the noiseless logits. Drawn from the
    # torch RNG, which checkpoints carry, so a resume stays exact.
    gate_noise: float = 0.0

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts, 1)
        check_float("gate_noise", self.gate_noise, 0.0, 1e3)
        check_float("k", self.k)  # a finite real; the router's own range first (SoftMoE: k < E), then (0, E]
        self.check_k(self.k, self.num_experts)
        if not 0 < self.k <= self.num_experts:
            raise ValueError(f"k={self.k} must be in (0, num_experts={self.num_experts}]")
        check_float("lb_coef", self.lb_coef, 0.0)
        check_float("z_coef", self.z_coef, 0.0)
        check_int("dispatch_cap", self.dispatch_cap, 1, self.num_experts, allow_none=True)

    def max_pairs(self, num_tokens: int) -> int | None:
        """The static bound on routed pairs of `num_tokens` tokens (T * dispatch_cap), or None: exact N."""
        return None if self.dispatch_cap is None else num_tokens * self.dispatch_cap

    @classmethod
    def check_k(cls, k: float, num_experts: int) -> None:
        """Raise ValueError unless this router accepts k for num_experts experts (after the shared
        check k in (0, E]). The model config calls it on its coarse (k, E) too. Default: no more rule."""

    def nominal_active_experts(self) -> float:
        """Experts per token this config asks for: a nominal budget, not a measurement (default k).

        Routers whose count is not k override it (null experts); where the count is data dependent
        (top-p, ReMoE) it stays k. The realised count is `stats["active_experts_mean"]`.
        """
        return float(self.k)


@dataclass(frozen=True)
class RouterOptions:
    """One router's options: its config's fields less `num_experts` and `k` (the model supplies those), typed, with
    the config's defaults. `register_router` derives one subclass per router (`router_cls.options_class`, e.g.
    `SoftKOptions`); `router_options(name, **values)` builds one. `ModelConfig.router_options` holds it, built once
    when the config is parsed; the values are checked when `config(E, k)` builds the router's config. Values are
    already Python numbers: YAML is read (and its numbers coerced) at the config edge, never here.
    """

    router = ""  # the registered router's name (a class attribute of each derived class, not a field)

    def values(self) -> dict:
        """Option name -> value, every option (defaults included)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def changed(self) -> dict:
        """Option name -> value of the options that differ from the router's defaults (for listings)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def config(self, num_experts: int, k: float) -> RouterConfig:
        """The router's checked config with these options (ValueError / TypeError naming a bad value)."""
        return router_class(self.router).config_class(num_experts=num_experts, k=k, **self.values())

    def __reduce__(self):
        # derived classes are made at registration, so pickle by router name and values
        return _options_from_values, (self.router, self.values())


def _options_from_values(router: str, values: dict) -> RouterOptions:
    return router_class(router).options_class(**values)


def _options_class(name: str, config_cls: type[RouterConfig]) -> type[RouterOptions]:
    """The options dataclass of router `name`: `config_cls`'s fields less num_experts and k, same types and defaults."""
    specs = [(f.name, f.type, field(default=f.default, default_factory=f.default_factory))
             for f in fields(config_cls) if f.name not in ("num_experts", "k")]
    cls = make_dataclass(config_cls.__name__.removesuffix("Config") + "Options", specs, bases=(RouterOptions,),
                         frozen=True, namespace={"router": name})
    cls.__module__ = config_cls.__module__
    return cls


# --------------------------------------------------------------------------------------------
# Output and statistics
# --------------------------------------------------------------------------------------------


# One layer's routing statistics of one forward: name -> detached tensor (0-d, or a vector such as
# `active_experts_hist` (E + 1,) and `expert_load` (E,)). Built once, by `finish_routing`; carried unchanged
# through MoEOutput.stats and DecoderOutput.routing to the trainer; only the metrics writer turns it into floats
# (no host sync in forward). Its "k" is the layer's k (the budget's k_l for a budget router): the one report of k.
LayerStats = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RouterOutput:
    """What a router returns.

    Attributes:
        routing: the expert-sorted ragged routing to dispatch (padding tokens are not routed).
        logits_TE: (T, E) float32 router scores (for losses and inspection).
        aux_loss: 0-d float32, the configured weighted sum of auxiliary losses (differentiable).
        stats: this forward's detached statistics (`LayerStats`: name -> tensor).
    """

    routing: Routing
    logits_TE: torch.Tensor
    aux_loss: torch.Tensor
    stats: LayerStats


class NonFiniteLogits(ValueError):
    """Router scores hold NaN/inf (in training: diverged weights; the trainer skips such a step)."""


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, real_T: torch.Tensor | None) -> torch.Tensor:
    """(T, E) float32 router scores W x, computed in fp32 even under autocast (gate stability).

    Padding rows (real_T False) are zeroed before the gate, so their logits are 0 and whatever they held
    (even NaN) reaches neither the routing weights, the aux losses nor the gate's weight gradient. real_T None:
    no padding (every token real).
    """
    x_TD = x_TD.float() if real_T is None else torch.where(real_T.unsqueeze(-1), x_TD.float(), 0.0)
    # Autocast is turned off only where it is on: entering its context costs as much as a few operators.
    no_autocast = (torch.autocast(device_type=x_TD.device.type, enabled=False)
                   if torch.is_autocast_enabled(x_TD.device.type) else contextlib.nullcontext())
    with no_autocast:
        logits_TE = F.linear(x_TD, weight_ED.float())
    # One host sync (SOFTMOE_CHECKS, on by default on CPU): never route on NaN/inf scores. Off on GPUs, where
    # the training loop's non-finite guard catches them.
    if value_checks_enabled(logits_TE) and not all_finite(logits_TE):
        raise NonFiniteLogits("router logits are not finite: the input holds NaN/inf in a real (non-padding) token "
                         f"(x of shape {tuple(x_TD.shape)})")
    return logits_TE


def step_routers(calls) -> None:
    """Between optimizer steps: each router class's `after_step` (the loss-free balancing bias, ReMoE's L1
    coefficient) from the step's counts. What every training loop calls, softmoe's own (train/controllers.py)
    and a user's (`softmoe.layers.after_step`).

    Args:
        calls: (router, counts) pairs, counts holding `expert_counts` (E,) and `real_tokens` (a layer's stats);
            a router listed several times (micro-batches) has its counts summed. Routers in eval mode are
            left alone.
    """
    routers: dict[int, GateRouter] = {}
    sums = diagnostics.RoutingCounts()  # keyed by router: its micro-batches add up
    for router, counts in calls:
        if router.training:
            routers[id(router)] = router
            sums.add({id(router): counts})
    by_class: dict[type, list] = {}
    for key, counts in sums.counts.items():
        by_class.setdefault(type(routers[key]), []).append((routers[key], counts))
    with torch.no_grad():
        for cls, layers in by_class.items():  # pooled rules (ReMoE) see all their layers at once
            cls.after_step(layers)


def real_tokens(mask_T: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    """(T,) bool, True for real tokens; all True when there is no padding mask."""
    if mask_T is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return mask_T.to(device=device, dtype=torch.bool)


def finish_routing(
    routing: Routing,
    logits_TE: torch.Tensor,
    real_T: torch.Tensor,
    config: RouterConfig,
    k: torch.Tensor,
    extra_loss: torch.Tensor | None = None,
    extra_stats: dict[str, torch.Tensor] | None = None,
    balance_loss: torch.Tensor | None = None,
) -> RouterOutput:
    """Attach the aux losses and statistics every router reports to a finished routing (template step 5).

    Args:
        routing: the routing that will be dispatched.
        logits_TE: (T, E) float32 router scores.
        real_T: (T,) bool, True for real (non-padding) tokens.
        config: the router's config (loss coefficients).
        k: 0-d tensor, the layer's k (fixed top-k, or the soft top-k mass k_l: nominal, not the realized count).
        extra_loss: optional 0-d loss already weighted (e.g. a standalone budget penalty).
        extra_stats: optional more 0-d/vector tensors to report.
        balance_loss: optional 0-d balance loss that replaces the Switch loss (unweighted: lb_coef applies).
    """
    mask_T = real_T.float()
    # The global batch's load and real tokens under data parallelism (one collective for both).
    summed = losses.global_sum(torch.cat([routing.counts_E.float(), mask_T.sum().reshape(1)]))
    counts_E, tokens = summed[:-1], summed[-1]
    if balance_loss is None:
        lb = losses.load_balance_loss(counts_E, torch.softmax(logits_TE, dim=-1), mask_T)
    else:
        lb = balance_loss
    z = losses.z_loss(logits_TE, mask_T)
    aux = config.lb_coef * lb + config.z_coef * z
    if extra_loss is not None:
        aux = aux + extra_loss
    active_T = routing.active_per_token()
    stats = {
        "k": k.float().clone(),  # not a view of k_L: torch.compile cannot replay a view of a select as an output
        "active_experts_mean": losses.masked_mean(active_T.float(), mask_T),
        "active_experts_hist": losses.active_histogram(active_T, mask_T, config.num_experts),
        "expert_load": losses.expert_load(counts_E),
        "expert_counts": counts_E.detach(),
        "real_tokens": tokens.detach(),
        **diagnostics.load_diagnostics(counts_E),
        "logit_spread": diagnostics.logit_spread(logits_TE.detach(), mask_T),
        "weight_sum_mean": _weight_per_token(routing, mask_T),
        "load_balance_loss": lb,
        "z_loss": z,
    }
    stats.update(extra_stats or {})
    return RouterOutput(routing=routing, logits_TE=logits_TE, aux_loss=aux,
                        stats={name: value.detach() for name, value in stats.items()})


def _weight_per_token(routing: Routing, mask_T: torch.Tensor) -> torch.Tensor:
    """0-d float32 mean over real tokens of the sum of their combine weights (the MoE output's scale: 1 for
    renormalised top-k, the kept soft mass for the paper's raw-p combine). Padding pairs carry weight 0."""
    # float64: a static-size routing (padding pairs) sums in another order; the mean must not depend on it
    return (routing.weight_N.detach().double().sum() / mask_T.sum().clamp(min=1.0)).float()


@dataclass(frozen=True)
class Rule:
    """What a router's rule returns to the template.

    Attributes:
        routing: the expert-sorted ragged routing to dispatch (padding tokens not routed).
        loss: optional 0-d router-specific loss, already weighted, added to aux_loss.
        stats: router-specific 0-d/vector statistics (`finish_routing` detaches them).
        balance_loss: optional 0-d balance loss replacing the Switch loss (weighted by lb_coef), for a rule
            whose balance is not the Switch loss over E experts (null experts).
    """

    routing: Routing
    loss: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    balance_loss: torch.Tensor | None = None


class GateRouter(torch.nn.Module):
    """The router template: a linear gate W (no bias), the frozen config, and the shared steps.

    A router subclasses it and implements `rule(logits_TE, real_T, k) -> Rule` only. `forward(x_TD, mask_T)`
    runs the template (`route`). What code outside routing/ may ask a router class, instead of its name:

        name                   the registered name (set by `register_router`)
        config_class           its config dataclass (set by `register_router`)
        label                  its name in tables and plots ("SoftMoE", "top-k", ...)
        uses_budget            takes the model's global budget k_l (the `k` argument): a `BudgetRouter`
        causal                 False when a token's routing depends on other tokens of the call (expert
                               choice): the model then refuses KV-cache decoding
        fixed_active_experts   the mean experts per token is set by the config (top-k, expert choice), so a
                               per-layer plot of the realised count says nothing
        marker                 its matplotlib marker in the comparison plots
        describe(k, E)         "k=2 of 8" (or "soft mass K=2 of 8, learned k_l" / "fixed soft mass k=2 of 8"), for run
                               listings and report labels

    A rule builds the Routing it returns with `self.to_routing(weight_TE, keep_TE)`, which sizes it as the
    config's `dispatch_cap` asks (exact N by default, or a static bound with no host sync).

    Attributes:
        gate: Linear(D, E), no bias (a router may replace it by a wider one: null experts' E + num_null rows).
        balance: the loss-free selection bias (routing/balance.py) where the rule uses one, else None; the
            template records each forward's load into it and reports its statistics.
    """

    name: str
    config_class: type
    options_class: type  # its RouterOptions subclass (set by `register_router`)
    label: str = ""
    uses_budget = False
    has_threshold = False  # truncates by a relative `threshold` buffer that count controllers steer (SoftMoE)
    causal = True
    fixed_active_experts = False
    marker = "D"

    def __init__(self, d_model: int, config: RouterConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.gate = torch.nn.Linear(d_model, config.num_experts, bias=False)
        self.balance = None

    @classmethod
    def describe(cls, k: float, num_experts: int, learned: bool = True, realized: bool = False) -> str:
        """The configured count for listings: "k=2 of 8"; for a budget router what K holds and whether the k_l
        are learned: "soft mass K=2 of 8, learned k_l" (the paper's rule: K is the soft top-k mass, not the
        realized count), "realized count K=2 of 8, learned k_l" (`realized`: the realized-count budget), or
        "fixed soft mass k=2 of 8" when the budget does not learn the k_l (`learned=False`: each k_l = K)."""
        count = f"={k:g} of {num_experts}"
        if not cls.uses_budget:
            return f"k{count}"
        held = "realized count" if realized else "soft mass"
        return f"{held} K{count}, learned k_l" if learned else f"fixed {held} k{count}"

    def rule(self, logits_TE: torch.Tensor, real_T: torch.Tensor, k: torch.Tensor) -> Rule:
        """The router's own rule (template step 4).

        Args:
            logits_TE: (T, rows of the gate: E, or E + num_null for null experts) float32 router scores,
                padding rows 0.
            real_T: (T,) bool, True for real tokens: keep padding out of the routing.
            k: 0-d float32, the layer's k (`fixed_k`, or the budget's k_l).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement rule()")

    def to_routing(self, weight_TE: torch.Tensor, keep_TE: torch.Tensor) -> Routing:
        """The Routing of the kept (token, expert) pairs, sized as this router's config asks (`dispatch_cap`:
        static, no host sync; default exact): how a `rule` builds the routing it returns.

        Args:
            weight_TE: (T, E) float combine weights. keep_TE: (T, E) bool routed pairs (padding excluded).
        """
        return routing_from_mask(weight_TE, keep_TE, self.config.max_pairs(keep_TE.shape[0]))

    @classmethod
    def after_step(cls, layers: list[tuple["GateRouter", Mapping]]) -> None:
        """Between optimizer steps: update the non-learned state of this class's routers from the step's counts.

        Called by the training loop (train/controllers.py) once per good optimizer step, with every router of
        this class and the counts its layer returned in the step (`expert_counts` (E,) and `real_tokens`, summed
        over the micro-batches; global under data parallelism). Nothing is counted during forward: the counts
        arrive here as return values. Default: the loss-free selection bias of each router that has one.
        Pooled rules (ReMoE's one lambda decision for all its layers) override it.
        """
        for router, counts in layers:
            if router.balance is not None:
                router.balance.step(counts["expert_counts"])

    def noised(self, logits_TE: torch.Tensor, real_T: torch.Tensor) -> torch.Tensor:
        """(T, E) the scores the rule routes on: in training with `gate_noise` > 0, logits + gate_noise * N(0, 1) on
        real tokens (padding rows stay 0); otherwise the logits themselves."""
        if not (self.training and self.config.gate_noise > 0):
            return logits_TE
        return logits_TE + self.config.gate_noise * torch.randn_like(logits_TE) * real_T.unsqueeze(-1)

    def fixed_k(self, device: torch.device) -> torch.Tensor:
        """0-d float32 k of a router without a budget: its config's k (reported as stats["k"])."""
        return torch.tensor(float(self.config.k), device=device)

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None,
                k: torch.Tensor | None = None, measure: bool = True) -> RouterOutput:
        """Route T tokens: every router is called this way.

        Args:
            x_TD: (T, D) token hidden states.
            mask_T: optional (T,) bool, True = real token; padding is not routed.
            k: optional 0-d tensor, this layer's k_l from the model's budget (differentiable); only routers that
                take a budget (`uses_budget`) accept it. None: the router's own k (`standalone_k`).
            measure: False routes only (decoding): no aux loss (0) and no statistics, about half the router's
                operators (each one a kernel launch on a GPU); refused where gradients are on (training needs
                the aux losses).
        """
        if not measure and torch.is_grad_enabled():
            raise ValueError("measure=False skips the aux losses: it is for inference (under torch.no_grad or "
                             "torch.inference_mode), not for a forward that will be backpropagated")
        if k is None:
            k, k_loss = self.standalone_k(x_TD.device)
        elif not self.uses_budget:
            raise ValueError(f"router={self.name!r} takes no budget k_l (uses_budget=False); k must be None")
        elif not isinstance(k, torch.Tensor) or k.dim() != 0:
            raise ValueError(f"k must be a 0-d tensor (this layer's k_l), got {k!r}")
        else:
            k, k_loss = k.float(), None
        return self.route(x_TD, mask_T, k, k_loss, measure)

    def standalone_k(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k, its weighted loss or None) without a budget: the config's fixed k."""
        return self.fixed_k(device), None

    def route(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None, k: torch.Tensor,
              k_loss: torch.Tensor | None = None, measure: bool = True) -> RouterOutput:
        """The template: mask -> fp32 logits -> `rule` -> balance record -> losses and statistics.

        Args:
            x_TD: (T, D) token hidden states.
            mask_T: optional (T,) bool, True = real token.
            k: 0-d float32 layer k.
            k_loss: optional 0-d weighted loss of k itself (a standalone learned k's penalty).
            measure: False stops after the rule: aux_loss 0, stats empty (see `forward`).
        """
        real_T = real_tokens(mask_T, x_TD.shape[0], x_TD.device)
        logits_TE = router_logits(x_TD, self.gate.weight, None if mask_T is None else real_T)
        ruled = self.rule(self.noised(logits_TE, real_T), real_T, k)
        if not measure:
            return RouterOutput(routing=ruled.routing, logits_TE=logits_TE, aux_loss=logits_TE.new_zeros(()),
                                stats={})
        stats = dict(ruled.stats)
        if self.balance is not None:
            stats.update(self.balance.stats())
        extra_loss = k_loss
        if ruled.loss is not None:
            extra_loss = ruled.loss if extra_loss is None else extra_loss + ruled.loss
        return finish_routing(ruled.routing, logits_TE, real_T, self.config, k, extra_loss, stats,
                              ruled.balance_loss)


class BudgetRouter(GateRouter):
    """A router that can take the layer's k_l from the model's global budget (`forward(x_TD, mask_T, k)`).

    Standalone (k None) it routes with `standalone_k` (default: the config's k).
    """

    uses_budget = True


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

ROUTERS: dict[str, tuple[type[RouterConfig], type[GateRouter]]] = {}


def register_router(name: str, config_cls: type[RouterConfig]) -> Callable[[type], type]:
    """Class decorator: make `build_router(name, ...)` build this router from `config_cls`."""

    def wrap(router_cls: type) -> type:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is already registered")
        ROUTERS[name] = (config_cls, router_cls)
        router_cls.name, router_cls.config_class = name, config_cls
        router_cls.options_class = _options_class(name, config_cls)
        router_cls.label = router_cls.__dict__.get("label") or name
        return router_cls

    return wrap


def router_class(name: str) -> type[GateRouter]:
    """The registered router class `name` (ask it `uses_budget`, `causal`, `label`, `describe`, ...).

    Raises:
        ValueError: unknown router name.
    """
    if name not in ROUTERS:
        raise ValueError(f"router={name!r} is not one of the registered routers {sorted(ROUTERS)}")
    return ROUTERS[name][1]


def router_options(name: str, **values) -> RouterOptions:
    """The typed options of the registered router `name` (`router_class(name).options_class(**values)`).

    Raises:
        ValueError: unknown router name, or an option the router does not have (naming it and its value).
    """
    options_cls = router_class(name).options_class
    check_known(f"router={name!r}", values, [f.name for f in fields(options_cls)])
    return options_cls(**values)


def router_config(name: str, num_experts: int, k: float, **options) -> RouterConfig:
    """The checked config `config_cls(num_experts, k, **options)` of the registered router `name`.

    Raises:
        ValueError: unknown router name, an option the router does not have, or an invalid value.
    """
    return router_options(name, **options).config(num_experts, k)


def build_router(name: str, d_model: int, num_experts: int, k: float, **options) -> GateRouter:
    """Build the registered router `name` with config `router_config(name, num_experts, k, **options)`.

    Raises:
        ValueError: unknown router name, an option the router does not have, or an invalid value.
    """
    config = router_config(name, num_experts, k, **options)
    check_int("d_model", d_model, 1)
    return router_class(name)(d_model, config)
