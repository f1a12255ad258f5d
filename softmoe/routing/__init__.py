"""Routers and the shared ragged routing format."""

from softmoe.routing.record import Routing, routing_from_mask, select_experts, truncate

__all__ = ["Routing", "routing_from_mask", "select_experts", "truncate"]
