"""What must be global, not per rank: count sums for routing, means of logged metrics.

The routers' balance statistics read their counts through `softmoe.routing.losses.global_sum`, which
`counts_summed_over(group)` makes an all-reduce (see parallel/trainer.py `_forward_fn`); the controllers get
(their layers return global counts, which the controllers read). Logged values are averaged here, so every
rank logs the global batch's numbers (ranks hold equal token counts).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["counts_summed_over", "mean_over_ranks", "global_layer_summary", "SUMMED_KEYS"]

# Per-layer entries that are counts of the whole batch (summed over ranks); every other number is a mean.
SUMMED_KEYS = frozenset({"active_experts_hist"})


def counts_summed_over(group: dist.ProcessGroup | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function t -> t summed over the ranks of `group` (a new tensor; no gradient)."""

    def sum_fn(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            total = t.detach().clone()
            dist.all_reduce(total, group=group)
        return total

    return sum_fn


def mean_over_ranks(values: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """Each float averaged over the ranks of `group` (float64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def global_layer_summary(layers: list[dict], group: dist.ProcessGroup | None = None) -> list[dict]:
    """`routing_summary` records averaged over ranks (counts in SUMMED_KEYS summed); one collective.

    Every rank holds the same layers and keys (the same model), so the values line up.
    """
    slots = [(i, key) for i, layer in enumerate(layers) for key, value in layer.items()
             if key != "block" and _numeric(value)]
    if not slots:
        return layers
    flat, sizes = [], []
    for i, key in slots:
        values = layers[i][key] if isinstance(layers[i][key], list) else [layers[i][key]]
        flat += [float(v) for v in values]
        sizes.append(len(values))
    t = torch.tensor(flat, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    size = dist.get_world_size(group)
    out = [dict(layer) for layer in layers]
    for (i, key), part in zip(slots, t.split(sizes)):
        part = part if key in SUMMED_KEYS else part / size
        out[i][key] = part.tolist() if isinstance(layers[i][key], list) else part.item()
    return out


def _numeric(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
