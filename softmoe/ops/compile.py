"""torch.compile for the routing hot path: the whole graph (fullgraph=True), one data-dependent size.

A dropless MoE layer has exactly one size that depends on the data: N, the routed (token, expert) pairs,
which `nonzero` produces when the routing is built. Dynamo captures it as an unbacked symbolic size when
`capture_dynamic_output_shape_ops` is on, so the router, the soft top-k op and the layer trace into one
graph instead of breaking there. `compile_model` turns that on for the calls of the compiled function
only (a config patch around each call, not a process-wide setting). Under tracing the value checks are
off (softmoe/ops/checks.py), the soft top-k takes its fixed-work solver, and the layer its sync-free paths
(index_add per-token sums, grouped experts).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["compile_model"]


def compile_model(fn: Callable, fullgraph: bool = True, dynamic: bool | None = None, **options) -> Callable:
    """`torch.compile(fn, fullgraph=fullgraph, dynamic=dynamic, **options)` with the ragged size N captured.

    Args:
        fn: a function or an nn.Module (its parameters stay shared with the compiled callable).
        fullgraph: one graph or an error (True); False lets Dynamo break the graph where it must (the
            training loop's `train.compile`: float32 experts under tracing are not grouped, see
            layers/experts.py, and fall back to a loop with a host sync).
        dynamic: torch.compile's `dynamic` (None: sizes become dynamic once they change).
        **options: more torch.compile keyword arguments (e.g. backend="aot_eager" in tests).
    Returns:
        a callable with fn's signature.
    """
    compiled = torch.compile(fn, fullgraph=fullgraph, dynamic=dynamic, **options)

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return compiled(*args, **kwargs)

    return call
