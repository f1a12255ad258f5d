"""What every router shares: its config base, its output, its statistics, and the registry.

Shape legend:
    T   tokens
    D   d_model
    E   experts

A router is an nn.Module with `forward(x_TD, mean_k=None, mask_T=None) -> RouterOutput`. It differs
from the others only in how it fills the one ragged `Routing` record; the layer never branches on
which router it holds. Adding a router is one file: a frozen config dataclass (subclass of
`RouterConfig`) and a module decorated with `@register_router("name", ConfigClass)`, imported
in `softmoe/routing/__init__.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from softmoe.ops.checks import value_checks_enabled
from softmoe.routing import losses
from softmoe.routing.record import Routing

__all__ = [
    "RouterConfig",
    "RouterOutput",
    "LayerStats",
    "GateRouter",
    "ROUTERS",
    "register_router",
    "build_router",
    "router_config",
    "router_logits",
    "finish_routing",
    "real_tokens",
]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def check_float(name: str, value, low: float = -math.inf, high: float = math.inf, open_low=False) -> None:
    """Raise TypeError/ValueError naming `name` unless value is a finite real in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    bad_low = value <= low if open_low else value < low
    if not math.isfinite(value) or bad_low or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}={value} must be a finite number in {bracket}{low}, {high}]")


@dataclass(frozen=True)
class RouterConfig:
    """Fields every router has. Subclasses add theirs and extend `__post_init__`."""

    num_experts: int  # E
    k: float  # experts per token (top-k) or mean active experts (soft routers)
    lb_coef: float = 0.01  # weight of the Switch load-balancing loss in aux_loss (Fedus et al. 2021)
    z_coef: float = 1e-3  # weight of the router z-loss in aux_loss (Zoph et al. 2022)

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts!r} must be an int >= 1")
        check_float("k", self.k, 0.0, self.num_experts, open_low=True)
        check_float("lb_coef", self.lb_coef, 0.0)
        check_float("z_coef", self.z_coef, 0.0)

    def nominal_active_experts(self) -> float:
        """Experts per token this config asks for: a nominal budget, not a measurement (default k).

        Routers whose count is not k override it (null experts); where the count is data dependent
        (top-p, ReMoE) it stays k. The realised count is `stats["active_experts_mean"]`.
        """
        return float(self.k)


# --------------------------------------------------------------------------------------------
# Output and statistics
# --------------------------------------------------------------------------------------------


class LayerStats(Mapping):
    """Detached per-forward statistics of one layer, read as a mapping or as attributes.

    Values are stored as detached tensors (no host sync in forward). Reading one converts 0-d
    entries to Python floats; vector entries (`active_experts_hist`, `expert_load`) stay tensors.
    `tensors` gives the raw dict for callers that want to stay asynchronous.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        object.__setattr__(self, "tensors", {name: t.detach() for name, t in tensors.items()})

    @staticmethod
    def _read(t: torch.Tensor):
        return float(t) if t.dim() == 0 else t

    def __getitem__(self, name: str):
        return self._read(self.tensors[name])

    def __getattr__(self, name: str):
        tensors = self.__dict__.get("tensors", {})
        if name not in tensors:
            raise AttributeError(f"LayerStats has no entry {name!r}; entries: {sorted(tensors)}")
        return self._read(tensors[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"LayerStats({ {name: self[name] for name in self} })"


@dataclass(frozen=True)
class RouterOutput:
    """What a router returns.

    Attributes:
        routing: the expert-sorted ragged routing to dispatch (padding tokens are not routed).
        logits_TE: (T, E) float32 router scores (for losses and inspection).
        aux_loss: 0-d float32, the configured weighted sum of auxiliary losses (differentiable).
        stats: detached statistics of this forward.
    """

    routing: Routing
    logits_TE: torch.Tensor
    aux_loss: torch.Tensor
    stats: LayerStats


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, real_T: torch.Tensor) -> torch.Tensor:
    """(T, E) float32 router scores W x, computed in fp32 even under autocast (gate stability).

    Padding rows (real_T False) are set to 0, so whatever they hold (even NaN) cannot reach the
    routing weights or the aux losses.
    """
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        logits_TE = F.linear(x_TD.float(), weight_ED.float())
    logits_TE = torch.where(real_T.unsqueeze(-1), logits_TE, 0.0)
    # One host sync (SOFTMOE_CHECKS, on by default on CPU): never route on NaN/inf scores. Off on GPUs, where
    # the training loop's non-finite guard catches them.
    if value_checks_enabled(logits_TE) and not bool(torch.isfinite(logits_TE).all()):
        raise ValueError("router logits are not finite: the input holds NaN/inf in a real (non-padding) token "
                         f"(x of shape {tuple(x_TD.shape)})")
    return logits_TE


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
) -> RouterOutput:
    """Attach the aux losses and statistics every router reports to a finished routing.

    Args:
        routing: the routing that will be dispatched.
        logits_TE: (T, E) float32 router scores.
        real_T: (T,) bool, True for real (non-padding) tokens.
        config: the router's config (loss coefficients).
        k: 0-d tensor, the layer's k (fixed top-k or mean active experts).
        extra_loss: optional 0-d loss already weighted (e.g. a standalone budget penalty).
        extra_stats: optional more 0-d/vector tensors to report.
    """
    mask_T = real_T.float()
    counts_E = losses.global_sum(routing.counts_E)  # the global batch's load under data parallelism
    lb = losses.load_balance_loss(counts_E, torch.softmax(logits_TE, dim=-1), mask_T)
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
        "load_balance_loss": lb,
        "z_loss": z,
    }
    stats.update(extra_stats or {})
    return RouterOutput(routing=routing, logits_TE=logits_TE, aux_loss=aux, stats=LayerStats(stats))


class GateRouter(torch.nn.Module):
    """Base of every router: a linear gate W (E x D, no bias) and the router's frozen config.

    Subclasses implement `forward(x_TD, mean_k=None, mask_T=None) -> RouterOutput`; routers that take
    a budget k_l set `uses_budget = True`. `causal = False` marks a router whose routing of a token
    depends on other tokens of the call (expert choice): the model refuses KV-cache decoding with it.
    """

    uses_budget = False
    causal = True

    def __init__(self, d_model: int, config: RouterConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.gate = torch.nn.Linear(d_model, config.num_experts, bias=False)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

ROUTERS: dict[str, tuple[type[RouterConfig], type[torch.nn.Module]]] = {}


def register_router(name: str, config_cls: type[RouterConfig]) -> Callable[[type], type]:
    """Class decorator: make `build_router(name, ...)` build this router from `config_cls`."""

    def wrap(router_cls: type) -> type:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is already registered")
        ROUTERS[name] = (config_cls, router_cls)
        router_cls.name = name
        return router_cls

    return wrap


def router_config(name: str, num_experts: int, k: float, **options) -> RouterConfig:
    """The checked config `config_cls(num_experts, k, **options)` of the registered router `name`.

    Raises:
        ValueError: unknown router name, an option the router does not have, or an invalid value.
    """
    if name not in ROUTERS:
        raise ValueError(f"router={name!r} is not one of the registered routers {sorted(ROUTERS)}")
    config_cls = ROUTERS[name][0]
    valid = {f.name for f in fields(config_cls)} - {"num_experts", "k"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for router={name!r}; valid options: {sorted(valid)}")
    types = {f.name: f.type for f in fields(config_cls)}
    options = {name: _number_from_yaml(name, value, types[name]) for name, value in options.items()}
    return config_cls(num_experts=num_experts, k=k, **options)


def _number_from_yaml(name: str, value, kind) -> object:
    """YAML 1.1 reads `1e-3` as the string '1e-3': read such a string as the float a float field declares."""
    if kind in ("float", float, "float | None") and isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    return value


# What YAML 1.1 leaves as a string although it is a float: a mantissa without a dot and an exponent (1e-3).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def build_router(name: str, d_model: int, num_experts: int, k: float, **options) -> torch.nn.Module:
    """Build the registered router `name` with config `router_config(name, num_experts, k, **options)`.

    Raises:
        ValueError: unknown router name, an option the router does not have, or an invalid value.
    """
    config = router_config(name, num_experts, k, **options)
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model={d_model!r} must be an int >= 1")
    return ROUTERS[name][1](d_model, config)
