"""Routers, the shared ragged routing format, the global expert budget and aux losses.

Importing a router module registers it; a new router is one file plus one import line here (the
registration order is the order of the routers in tables and plot colours).
"""

from softmoe.routing.base import (
    ROUTERS,
    LayerStats,
    RouterConfig,
    RouterOptions,
    RouterOutput,
    Rule,
    GateRouter,
    BudgetRouter,
    build_router,
    register_router,
    router_class,
    router_config,
    router_options,
)
from softmoe.routing.budget import Budget, BudgetOptions
from softmoe.routing.record import DispatchOverflow, Routing, routing_from_mask, select_experts, truncate
from softmoe.routing.softk import SoftKConfig, SoftKRouter, relative_keep
from softmoe.routing.topk import TopKConfig, TopKRouter
from softmoe.routing.topp import TopPConfig, TopPRouter
from softmoe.routing.remoe import ReMoEConfig, ReMoERouter
from softmoe.routing.null import NullConfig, NullRouter
from softmoe.routing.expert_choice import ExpertChoiceConfig, ExpertChoiceRouter
from softmoe.routing.balance import BiasBalanceConfig, ExpertBias

__all__ = [
    "relative_keep",
    "Routing",
    "routing_from_mask",
    "DispatchOverflow",
    "select_experts",
    "truncate",
    "Budget",
    "BudgetOptions",
    "ROUTERS",
    "LayerStats",
    "RouterConfig",
    "RouterOptions",
    "RouterOutput",
    "Rule",
    "GateRouter",
    "BudgetRouter",
    "build_router",
    "router_class",
    "register_router",
    "router_config",
    "router_options",
    "SoftKConfig",
    "SoftKRouter",
    "TopKConfig",
    "TopKRouter",
    "TopPConfig",
    "TopPRouter",
    "NullConfig",
    "NullRouter",
    "ExpertChoiceConfig",
    "ExpertChoiceRouter",
    "ReMoEConfig",
    "ReMoERouter",
    "BiasBalanceConfig",
    "ExpertBias",
]
