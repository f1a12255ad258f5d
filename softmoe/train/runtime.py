"""Process settings for training on CPU: a bound on the matmul libraries' per-shape caches.

oneDNN (through ideep) keeps an LRU cache of matmul primitives per problem shape, ~1 MB per entry
for the bf16 expert matmuls, up to 1024 entries per cache by default. A dense model has a few dozen
shapes, but an MoE layer's padded expert batches change shape with the routing, so a training
process grew by megabytes per step until the caches were full (measured: 2.4 GB after 60 demo top-k
steps against 0.85 GB for the dense model; docs/benchmarks.md). A training step needs a few dozen
shapes at most, so a cache of 64 entries keeps every hot shape and bounds the memory.

The caches read their capacity from the environment once, when the process runs its first such
matmul, so `bound_kernel_caches` must run before that (the Trainer calls it first thing). A value the
user already set is kept.
"""

from __future__ import annotations

import os

from softmoe.common.checks import check_int

__all__ = ["bound_kernel_caches", "KERNEL_CACHE_CAPACITY", "KERNEL_CACHE_VARIABLES"]

KERNEL_CACHE_CAPACITY = 64
# oneDNN's primitive cache and ideep's LRU cache (PyTorch's CPU bf16 matmuls go through both).
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """Set the per-shape kernel cache capacities unless already set; returns the values in effect.

    Args:
        capacity: entries per cache (>= 1).
    """
    check_int("capacity", capacity, 1)
    return {name: os.environ.setdefault(name, str(capacity)) for name in KERNEL_CACHE_VARIABLES}
