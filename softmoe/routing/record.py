"""The one routing format every router returns, and truncation of dense weights into it.

Shape legend:
    T   tokens
    E   experts
    N   routed (token, expert) pairs, data dependent (sum over tokens of their active experts)

A `Routing` is a flat list of (token, expert, weight) triples sorted by expert (ties by token), with
per-expert counts. Dispatch gathers x[token_N], runs expert e on rows offsets[e]:offsets[e+1], and
index-adds weight_N * y back into token_N. Top-k, soft top-k, top-p and ReLU routers all fit: a
variable number of experts per token needs nothing special.

Exact or static size. By default N is the exact number of routed pairs, which `nonzero` computes: on a GPU
that is one device-to-host sync per layer (the host must know N to size the buffers). With a static bound
(`routing_from_mask(..., max_pairs=N_max)`, what a router's `dispatch_cap` asks for: N_max = T * cap) the
routing always holds N_max pairs and no sync is needed: the real pairs come first, in the same order, and
the rest are padding pairs (token 0, expert E - 1, weight 0) past the last expert offset, which every expert
implementation leaves at zero output. A routing that would keep more than N_max pairs is an error (a clear
one where value checks run, a device-side assert elsewhere), never a silent drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softmoe.common.checks import check_float, check_int
from softmoe.ops.checks import value_checks_enabled

__all__ = ["DispatchOverflow", "Routing", "routing_from_mask", "select_experts", "truncate"]


class DispatchOverflow(ValueError):
    """A routing keeps more (token, expert) pairs than its static bound (T x the router's dispatch_cap)."""


@dataclass(frozen=True)
class Routing:
    """Ragged routing of T tokens over E experts, sorted by expert.

    Attributes:
        token_N: (N,) int64 token index of each pair, ascending within an expert.
        expert_N: (N,) int64 expert index of each pair, non-decreasing.
        weight_N: (N,) float combine weight of each pair (carries gradient to the router).
        counts_E: (E,) int64 number of pairs per expert; sums to N; zeros allowed.
        num_tokens: T.
    """

    token_N: torch.Tensor
    expert_N: torch.Tensor
    weight_N: torch.Tensor
    counts_E: torch.Tensor
    num_tokens: int

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.token_N.shape[0]

    @property
    def offsets_E1(self) -> torch.Tensor:
        """(E + 1,) int64 start of each expert's slice; offsets[E] == the real pairs (N without padding)."""
        return torch.nn.functional.pad(self.counts_E.cumsum(0), (1, 0))

    def real_pairs(self) -> torch.Tensor:
        """(N,) bool, False for the padding pairs of a static-size routing (they follow the real ones)."""
        return torch.arange(self.num_pairs, device=self.token_N.device) < self.counts_E.sum()

    def active_per_token(self) -> torch.Tensor:
        """(T,) int64 number of experts each token uses (a scatter-add: bincount would sync on CUDA)."""
        return self.token_N.new_zeros(self.num_tokens).scatter_add_(0, self.token_N, self.real_pairs().long())

    def dense_weights(self) -> torch.Tensor:
        """(T, E) weights with zeros for unrouted pairs (for references, tests and losses)."""
        dense = self.weight_N.new_zeros(self.num_tokens, self.num_experts)
        # accumulate: a padding pair (weight 0) may share its (token, expert) with a real one
        return dense.index_put((self.token_N, self.expert_N), self.weight_N, accumulate=True)


def routing_from_mask(weight_TE: torch.Tensor, keep_TE: torch.Tensor, max_pairs: int | None = None) -> Routing:
    """Build the expert-sorted ragged routing of the kept entries of a dense weight matrix.

    Args:
        weight_TE: (T, E) float combine weights (gradients flow to the kept entries).
        keep_TE: (T, E) bool, which (token, expert) pairs are routed.
        max_pairs: None (default): N = keep_TE.sum() exactly, one host sync on a GPU. An int N_max: a
            static-size routing of N_max pairs, padding after the real ones (module docstring), no sync.
    Returns:
        Routing with N = keep_TE.sum() pairs, or N_max.
    Raises:
        ValueError: mismatched shapes; max_pairs not an int >= 0. DispatchOverflow (a ValueError): more
            kept pairs than max_pairs, where value checks run (a device-side assert elsewhere).
    """
    if weight_TE.shape != keep_TE.shape or weight_TE.dim() != 2:
        raise ValueError(
            f"weight_TE {tuple(weight_TE.shape)} and keep_TE {tuple(keep_TE.shape)} must be the same 2-D shape"
        )
    if max_pairs is not None:
        return _static_routing(weight_TE, keep_TE, max_pairs)
    # Transposed nonzero lists pairs expert-major with tokens ascending: already in dispatch order.
    # (The pair count is data dependent, so this one host sync per layer is inherent to dropless.)
    expert_N, token_N = keep_TE.t().nonzero(as_tuple=True)
    return Routing(
        token_N=token_N,
        expert_N=expert_N,
        weight_N=weight_TE[token_N, expert_N],
        counts_E=keep_TE.sum(dim=0),
        num_tokens=weight_TE.shape[0],
    )


def _static_routing(weight_TE: torch.Tensor, keep_TE: torch.Tensor, max_pairs: int) -> Routing:
    """`routing_from_mask` with exactly `max_pairs` pairs: the real ones, then padding (no host sync)."""
    check_int("max_pairs", max_pairs, 0)
    num_experts = keep_TE.shape[1]
    counts_E = keep_TE.sum(dim=0)
    num_kept = counts_E.sum()
    bound = f"its static bound max_pairs={max_pairs} ({keep_TE.shape[0]} tokens x the router's dispatch_cap)"
    if value_checks_enabled(keep_TE):
        kept = int(num_kept)
        if kept > max_pairs:
            raise DispatchOverflow(f"the routing keeps {kept} (token, expert) pairs, more than {bound}; "
                                   "raise dispatch_cap")
    else:  # on the device, no sync: a CUDA device-side assert
        torch._assert_async(num_kept <= max_pairs, f"the routing keeps more pairs than {bound}")
    # Expert-major like `nonzero` of the transpose; rows past the kept pairs are filled with -1.
    pairs_N2 = keep_TE.t().nonzero_static(size=max_pairs, fill_value=-1)
    real_N = pairs_N2[:, 0] >= 0
    expert_N = torch.where(real_N, pairs_N2[:, 0], num_experts - 1)
    token_N = torch.where(real_N, pairs_N2[:, 1], 0)
    weight_N = torch.where(real_N, weight_TE[token_N, expert_N], 0.0)
    return Routing(token_N=token_N, expert_N=expert_N, weight_N=weight_N, counts_E=counts_E,
                   num_tokens=weight_TE.shape[0])


def select_experts(score_TE: torch.Tensor, min_weight: float = 0.0, max_active: int | None = None) -> torch.Tensor:
    """Which experts each token keeps: score >= min_weight, at most `max_active` (largest first).

    Every token keeps at least its highest-scoring expert, even when all its scores fall below
    `min_weight` (so no token is ever dropped).

    Args:
        score_TE: (T, E) float selection scores (e.g. soft top-k probabilities).
        min_weight: entries with score < min_weight are dropped; >= 0.
        max_active: optional cap on experts per token, in [1, E].
    Returns:
        keep_TE: (T, E) bool.
    """
    if score_TE.dim() != 2:
        raise ValueError(f"score_TE must be 2-D (tokens, experts), got shape {tuple(score_TE.shape)}")
    num_experts = score_TE.shape[1]
    check_float("min_weight", min_weight, 0)
    check_int("max_active", max_active, allow_none=True)
    if max_active is not None and not 1 <= max_active <= num_experts:
        raise ValueError(f"max_active={max_active} must be in [1, num_experts={num_experts}]")

    score = score_TE.detach()
    keep = score >= min_weight
    if max_active is not None and max_active < num_experts:
        top_idx = score.topk(max_active, dim=-1).indices
        keep &= torch.zeros_like(keep).scatter_(-1, top_idx, True)
    best = score.argmax(dim=-1, keepdim=True)
    return keep.scatter(-1, best, True)


def truncate(weight_TE: torch.Tensor, min_weight: float = 0.0, max_active: int | None = None) -> Routing:
    """Drop dense weights below `min_weight`, cap at `max_active` per token, return the Routing.

    Args:
        weight_TE: (T, E) float dense weights (selection uses their values).
        min_weight: see `select_experts`.
        max_active: see `select_experts`.
    Returns:
        Routing whose weight_N are the kept entries of weight_TE (not renormalised).
    """
    return routing_from_mask(weight_TE, select_experts(weight_TE, min_weight, max_active))
