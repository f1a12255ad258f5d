"""Between-step controllers: routing state that is not learned by gradient, updated after each optimizer step.

Shape legend:
    E   experts

Two controllers, one hook (`step`, called by the Trainer after every optimizer step):
    - ReMoE's L1 coefficient (Wang et al., ICLR 2025, sec. 3.2): lambda <- lambda * factor^sign(target - S),
      with S the sparsity pooled over every ReMoE layer and micro-batch of the step, target = 1 - k/E.
    - DeepSeek-V3's loss-free balancing bias (arXiv 2412.19437, sec. 2.1.2), per layer:
      b_e <- b_e + u * sign(mean load - load_e).

The state lives in the routers' persistent buffers (`ReMoERouter.l1_coef`, `ExpertBias.bias_E`), so it
is in `model.state_dict()` and a checkpoint resumes exactly; the routers count what the controllers read
(routed pairs, expert load) in non-persistent buffers, in training mode only. No config is mutated.
The update rules are pure functions of tensors; `step` only finds the routers and applies them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from softmoe.routing.balance import ExpertBias
from softmoe.routing.remoe import ReMoERouter

__all__ = ["multiplicative_update", "bias_update", "pooled_sparsity", "step"]


def multiplicative_update(coef: torch.Tensor, sparsity: torch.Tensor, target: float, factor: float) -> torch.Tensor:
    """ReMoE's controller: coef * factor if sparsity < target, coef / factor if above, unchanged if equal.

    Args:
        coef: 0-d float lambda.
        sparsity: 0-d float measured fraction of zero entries.
        target: wanted sparsity, 1 - k/E.
        factor: alpha > 1 (paper: 1.2).
    """
    return coef * factor ** torch.sign(target - sparsity).to(coef.dtype)


def bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's loss-free balancing step: (E,) bias + rate * sign(mean load - load).

    Under-loaded experts (load below the mean) gain `rate`, over-loaded ones lose it.

    Args:
        bias_E: (E,) float32 selection bias.
        load_E: (E,) int64 or float routed pairs per expert since the last update.
        rate: u > 0.
    """
    load = load_E.to(torch.float64)
    return bias_E + rate * torch.sign(load.mean() - load).to(bias_E.dtype)


def pooled_sparsity(routers: list[ReMoERouter]) -> torch.Tensor | None:
    """0-d float64 fraction of zero (token, expert) entries over all routers' counts; None if they saw nothing."""
    entries = sum(int(r.entries) for r in routers)
    if entries == 0:
        return None
    routed = sum(int(r.routed_pairs) for r in routers)
    return torch.tensor(1.0 - routed / entries, dtype=torch.float64)


def _update_l1_coefs(routers: list[ReMoERouter]) -> None:
    sparsity = pooled_sparsity(routers)
    if sparsity is None:
        return
    # One decision for the whole model (the paper's S_i averages all layers); every model built from
    # ModelConfig gives its layers the same k/E, and the mean covers standalone mixes.
    target = sum(r.config.target_sparsity for r in routers) / len(routers)
    for r in routers:
        r.l1_coef.copy_(multiplicative_update(r.l1_coef, sparsity, target, r.config.lambda_factor))


def _sum_counts(remoe: list[ReMoERouter], biases: list[ExpertBias],
                reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every router's step counts by their sum over processes (one collective for all of them)."""
    counts = [t.view(-1) for r in remoe for t in (r.routed_pairs, r.entries)] + [b.load_E for b in biases]
    if not counts:
        return
    total = reduce_sum(torch.cat(counts))
    for t, part in zip(counts, total.split([c.numel() for c in counts])):
        t.copy_(part)


def step(model: nn.Module, update: bool = True,
         reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """The after-optimizer-step hook: update every controller of `model`, then clear the step's counts.

    Args:
        model: any module holding ReMoE routers and/or loss-free biases (a no-op without them).
        update: False for a skipped (non-finite) step: the counts are dropped, the state is kept.
            Nothing is updated in eval mode either (evaluation never moves the state).
        reduce_sum: data parallel: sums a count tensor over the processes, so every rank updates from
            the global batch's counts and the controller state stays identical across ranks.
    """
    remoe = [m for m in model.modules() if isinstance(m, ReMoERouter)]
    biases = [m for m in model.modules() if isinstance(m, ExpertBias)]
    with torch.no_grad():
        if update and model.training:
            if reduce_sum is not None:
                _sum_counts(remoe, biases, reduce_sum)
            if remoe:
                _update_l1_coefs(remoe)
            for b in biases:
                b.bias_E.copy_(bias_update(b.bias_E, b.load_E, b.rate))
        for r in remoe:
            r.routed_pairs.zero_()
            r.entries.zero_()
        for b in biases:
            b.load_E.zero_()
