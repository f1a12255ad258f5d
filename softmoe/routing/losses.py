"""Auxiliary router losses and routing statistics, as pure functions of tensors.

Shape legend:
    T   tokens
    E   experts

`mask_T` is a float (T,) tensor, 1 for real tokens and 0 for padding; every mean below is over
real tokens only, so padding never moves a loss or a statistic.

Global counts (data parallel): inside `global_counts(sum_fn)` (softmoe/parallel enters it around the
forward of a multi-process run), `global_sum` sums a count tensor over the data-parallel ranks, so the
expert loads that balance losses and controllers see are those of the global batch. Outside it (every
single-process run) `global_sum` returns its argument unchanged: nothing is computed differently.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

__all__ = ["masked_mean", "expert_load", "load_balance_loss", "z_loss", "active_histogram", "global_counts",
           "global_sum"]

_GLOBAL_SUM: contextvars.ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = contextvars.ContextVar(
    "softmoe_global_sum", default=None)


@contextlib.contextmanager
def global_counts(sum_fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within this context `global_sum(t)` returns `sum_fn(t)`: t summed over the data-parallel ranks."""
    token = _GLOBAL_SUM.set(sum_fn)
    try:
        yield
    finally:
        _GLOBAL_SUM.reset(token)


def global_sum(counts: torch.Tensor) -> torch.Tensor:
    """A count (no gradient) summed over the data-parallel ranks inside `global_counts`; else `counts` itself."""
    sum_fn = _current_sum_fn()
    return counts if sum_fn is None else sum_fn(counts.detach())


@torch.compiler.assume_constant_result
def _current_sum_fn() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function `global_counts` set (None outside it). torch.compile cannot trace ContextVar.get: it reads
    this once per compilation as a constant (a run enters `global_counts` around every forward or never)."""
    return _GLOBAL_SUM.get()


def masked_mean(value_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Mean of value_T (T, ...) over the tokens with mask_T == 1; 0 when there are none."""
    mask = mask_T.reshape(mask_T.shape + (1,) * (value_T.dim() - 1))
    return (value_T * mask).sum(0) / mask_T.sum().clamp(min=1.0)


def expert_load(counts_E: torch.Tensor) -> torch.Tensor:
    """(E,) float32 fraction of routed (token, expert) pairs each expert received; sums to 1 (0 if none)."""
    counts = counts_E.float()
    return counts / counts.sum().clamp(min=1.0)


def load_balance_loss(counts_E: torch.Tensor, probs_TE: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Switch-style balance loss E * sum_e f_e * P_e, from the routing actually used.

    f_e is expert e's share of the routed pairs (padding is never routed, so it is excluded), P_e
    the mean router probability of e over real tokens. Data parallel: pass the global counts
    (`global_sum`) with this rank's probabilities; the mean over ranks of the loss is then the global
    batch's loss (ranks hold equal token counts), and so is the averaged gradient. Equals 1 at
    perfect balance. Only P carries gradient (Fedus et al. 2021, eq. 4); with a variable number of
    experts per token, f counts pairs.

    Args:
        counts_E: (E,) int64 pairs per expert of the routing that was dispatched.
        probs_TE: (T, E) float32 router probabilities (softmax of the logits).
        mask_T: (T,) float 1 = real token.
    Returns:
        0-d float32 loss.
    """
    num_experts = probs_TE.shape[-1]
    return num_experts * (expert_load(counts_E) * masked_mean(probs_TE, mask_T)).sum()


def z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over real tokens of logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022, eq. 5).

    Keeps router logits small, which keeps the fp32 gate and the soft top-k well conditioned.
    """
    return masked_mean(torch.logsumexp(logits_TE.float(), dim=-1).square(), mask_T)


def active_histogram(active_T: torch.Tensor, mask_T: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E + 1,) float32 number of real tokens using exactly j experts, j = 0..E (a scatter-add: no host sync)."""
    return mask_T.new_zeros(num_experts + 1, dtype=torch.float32).scatter_add_(0, active_T, mask_T.float())
