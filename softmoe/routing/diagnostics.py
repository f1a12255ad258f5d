"""Routing diagnostics: logit spread, expert load and dead experts, as pure functions of tensors.

Shape legend:
    T   tokens
    E   experts (the router's scored columns: E, or E + num_null for null experts)
    L   MoE layers

What users of every MoE library ask for first, computed from tensors the forward already has (no host sync):
    logit_spread       mean over real tokens of the std (over experts) of the fp32 router logits. Under the
                       paper's rule the realized count is set by this spread and by E, not by k (docs/routers.md,
                       "Nominal k and realized count").
    load_max_over_mean the busiest expert's routed pairs over the mean per expert (1 = perfect balance, E = one
                       expert takes everything).
    load_cv            coefficient of variation (std / mean) of the routed pairs per expert.
    dead_fraction      fraction of experts whose share of the routed pairs is below DEAD_LOAD (10%) of uniform.
A single forward's load is noisy; `RoutingCounts` sums each layer's routed pairs per expert and real tokens over
many forwards and reports the same load numbers over them. One accumulator serves every such sum: the counts of an
optimizer step that the controllers read (train/controllers.py), the training loop's logging window, an evaluation
pass, a transformers Trainer's logging interval, and the realized count of a set of batches (`active_L`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["DEAD_LOAD", "COUNT_KEYS", "logit_spread", "load_diagnostics", "RoutingCounts"]

DEAD_LOAD = 0.1  # an expert is dead when its share of the routed pairs is below DEAD_LOAD / E
COUNT_KEYS = ("expert_counts", "real_tokens")  # the raw counts a layer returns in its stats (per rank; softmoe's
# DDP trainer sums them over the ranks before its controllers read them)


def logit_spread(logits_TE: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """0-d float32: mean over real tokens (mask_T == 1) of the std over experts of the fp32 logits.

    Args:
        logits_TE: (T, E) router logits. mask_T: (T,) float, 1 = real token.
    """
    if logits_TE.shape[0] == 0:  # an empty batch: no tokens (torch's std would warn about its degrees of freedom)
        return logits_TE.new_zeros((), dtype=torch.float32)
    std_T = logits_TE.float().std(dim=-1, correction=0)
    return (std_T * mask_T).sum() / mask_T.sum().clamp(min=1.0)


def load_diagnostics(counts_E: torch.Tensor) -> dict[str, torch.Tensor]:
    """0-d float32 load statistics of routed-pair counts: load_max_over_mean, load_cv, dead_fraction.

    With no routed pair at all the load is undefined: max/mean and cv are reported as 0 and every expert as dead.

    Args:
        counts_E: (E,) routed (token, expert) pairs per expert (int or float).
    """
    counts = counts_E.float()
    mean = counts.mean()
    safe_mean = mean.clamp(min=torch.finfo(torch.float32).tiny)
    some = mean > 0
    return {
        "load_max_over_mean": torch.where(some, counts.max() / safe_mean, 0.0),
        "load_cv": torch.where(some, counts.std(correction=0) / safe_mean, 0.0),
        "dead_fraction": torch.where(some, (counts < DEAD_LOAD * mean).float().mean(), 1.0),
    }


class RoutingCounts:
    """Per MoE layer, the routed pairs per expert and the real tokens, summed over forwards (float64 device tensors;
    no host sync).

    `add(routing)` takes one forward's per-layer stats (layer index -> LayerStats, the name -> tensor dict holding `expert_counts`
    (E,) and `real_tokens`), in layer order; `layers` lists each layer's sums in that order, `active_L()` its realized
    active experts per token (pairs / real tokens), `summary()` its `expert_load` (fractions summing to 1) and
    `load_diagnostics`. `reset()` starts again; `state_dict()` / `load_state_dict()` carry open sums across a
    checkpoint, so a resumed run logs what the uninterrupted one would.
    """

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, routing: Mapping[int, Mapping]) -> None:
        """Add one forward's counts. `routing`: layer (block) index, or any key naming a layer, -> its stats
        (LayerStats: name -> tensor)."""
        for layer, stats in routing.items():
            new = {key: stats[key].detach().double() for key in COUNT_KEYS}
            old = self.counts.get(layer)
            self.counts[layer] = new if old is None else {key: old[key] + new[key] for key in COUNT_KEYS}

    @property
    def layers(self) -> list[dict[str, torch.Tensor]]:
        """Each layer's {"expert_counts": (E,), "real_tokens": 0-d} sums, in the order the layers were added."""
        return list(self.counts.values())

    def active_L(self) -> torch.Tensor:
        """(L,) float64 realized mean active experts per token of each layer: routed pairs / real tokens (empty
        before any forward)."""
        if not self.layers:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack([c["expert_counts"].sum() / c["real_tokens"].clamp(min=1) for c in self.layers])

    def summary(self) -> dict[int, dict[str, torch.Tensor]]:
        """Layer -> {"expert_load": (E,) fractions, "load_max_over_mean", "load_cv", "dead_fraction"}."""
        out = {}
        for layer, sums in self.counts.items():
            counts_E = sums["expert_counts"].float()
            out[layer] = {"expert_load": counts_E / counts_E.sum().clamp(min=1.0), **load_diagnostics(counts_E)}
        return out

    def reset(self) -> None:
        self.counts = {}

    def state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        return {layer: {key: t.cpu().clone() for key, t in sums.items()} for layer, sums in self.counts.items()}

    def load_state_dict(self, state: Mapping[int, Mapping[str, torch.Tensor]], device: torch.device | None = None
                        ) -> None:
        self.counts = {int(layer): {key: torch.as_tensor(sums[key], dtype=torch.float64, device=device).clone()
                                    for key in COUNT_KEYS} for layer, sums in state.items()}
