"""Expert parallelism over the ragged routing format: every router, variable k included.

Shape legend:
    N   routed (token, expert) pairs of this rank's tokens, sorted by expert
    M   pairs this rank's experts receive from all ranks of its EP group
    E   experts of the layer; El this rank's experts
    R   ranks of the expert-parallel group
    D   d_model

`ExpertParallelBank` replaces a layer's `ExpertBank` (same call: expert-sorted rows and counts in, their
outputs out, so the MoE layer is unchanged) and holds only the experts of its EP rank. A forward:
    1. all-gather the per-expert counts of every rank: counts_RE (one small collective), read once on
       the host: the only host sync, giving every send and receive size; backward reuses them;
    2. uneven all_to_all_single of the expert-sorted rows (autograd: its backward is the reverse
       all-to-all): rows for the experts of rank j go to rank j, which receives them source-major;
    3. permute the received rows to expert-major order and run the local experts on them;
    4. permute back and run the reverse all-to-all: each row returns to its source rank, in the order
       it was sent, where MoELayer's combine weights and sums it as in one process.
A rank, or an expert, that receives no rows runs on an empty batch (the graph stays connected).

Gradients: an expert's weights get the sum over the EP group's sources of their loss gradients;
`reduce_expert_grads` sums that over the ranks holding the same slice and divides by the world size,
which is the single-process gradient of the mean loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch import nn

from softmoe.layers.experts import ExpertBank, pad_rows
from softmoe.parallel.compat import all_gather_flat
from softmoe.parallel.world import World, expert_slice

__all__ = ["ExpertParallelBank", "expert_parallel", "expert_parameters", "reduce_expert_grads", "received_order"]


def received_order(counts_RE: torch.Tensor) -> torch.Tensor:
    """(M,) int64 index that sorts received rows (source-major, expert-sorted within a source) by expert.

    Args:
        counts_RE: (R, El) rows each source rank sends to each local expert (CPU or device tensor).
    Returns:
        perm_M: received[perm_M] is expert-major, sources in rank order within an expert.
    """
    lengths = counts_RE.reshape(-1)
    starts_src = lengths.cumsum(0) - lengths  # start of block (s, e) in the received buffer
    lengths_t, starts_t = counts_RE.t().reshape(-1), starts_src.view_as(counts_RE).t().reshape(-1)
    total = int(lengths.sum())
    target_starts = lengths_t.cumsum(0) - lengths_t
    offset_M = torch.repeat_interleave(starts_t - target_starts, lengths_t, output_size=total)
    return torch.arange(total, device=counts_RE.device) + offset_M


class ExpertParallelBank(ExpertBank):
    """The experts [first, first + El) of a layer on one EP rank; same call as ExpertBank.

    Args:
        bank: the full layer's bank (identical on every rank); its slice is copied.
        world: this rank's World (ep_group, ep_size, ep_rank).
    Parameters:
        w_gate, w_up: (El, D, H); w_down: (El, H, D): the slice of the full bank's tensors.
    """

    def __init__(self, bank: ExpertBank, world: World):
        num_experts, d_model, d_hidden = bank.w_gate.shape
        if num_experts < world.ep_size:
            raise ValueError(f"{num_experts} experts per layer cannot be sharded over parallel.expert="
                             f"{world.ep_size} ranks (each rank needs at least one expert)")
        first, count = expert_slice(num_experts, world.ep_size, world.ep_rank)
        super().__init__(count, d_model, d_hidden, impl=bank.impl)
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                getattr(self, name).copy_(getattr(bank, name)[first:first + count])
        self.num_experts_total, self.first = num_experts, first
        self.group, self.ep_size, self.ep_rank = world.ep_group, world.ep_size, world.ep_rank
        self.bounds = [expert_slice(num_experts, world.ep_size, r) for r in range(world.ep_size)]

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """(N, D) rows sorted by expert over all E experts, (E,) counts -> (N, D) their experts' outputs."""
        num_experts = counts_E.shape[0]
        counts_RE = counts_E.new_empty(self.ep_size * num_experts)
        all_gather_flat(counts_RE, counts_E.contiguous(), group=self.group)
        flat = counts_RE.tolist()  # the one host sync: all split sizes of this layer
        counts = [flat[r * num_experts:(r + 1) * num_experts] for r in range(self.ep_size)]
        me = self.ep_rank
        send = [sum(counts[me][first:first + n]) for first, n in self.bounds]
        mine = [row[self.first:self.first + self.w_gate.shape[0]] for row in counts]
        recv = [sum(row) for row in mine]
        num_rows = x_ND.shape[0]
        x_ND = x_ND[:sum(send)]  # without a static-size routing's padding rows (zero outputs, appended below)
        x_MD = all_to_all_single_autograd(x_ND.contiguous(), recv, send, self.group)
        local_RE = torch.tensor(mine, dtype=torch.long)
        perm_M = received_order(local_RE).to(x_ND.device)
        local_E = local_RE.sum(0).to(counts_E.device)
        y_MD = self.impl_fn(x_MD.device)(x_MD.index_select(0, perm_M), local_E, self.w_gate, self.w_up, self.w_down)
        rows_M = torch.arange(perm_M.shape[0], device=perm_M.device)
        inverse_M = torch.empty_like(perm_M).scatter_(0, perm_M, rows_M)
        y_MD = y_MD.index_select(0, inverse_M)
        return pad_rows(all_to_all_single_autograd(y_MD.contiguous(), send, recv, self.group), num_rows)

    def extra_repr(self) -> str:
        return (f"experts [{self.first}, {self.first + self.w_gate.shape[0]}) of {self.num_experts_total}, "
                f"ep_size={self.ep_size}, " + super().extra_repr())


def expert_parallel(model: nn.Module, world: World) -> list[str]:
    """Replace every MoE layer's ExpertBank by this rank's ExpertParallelBank, in place.

    Returns:
        the parameter names of the sharded experts (data parallelism must not average them).
    """
    from softmoe.layers.moe import MoELayer

    for module in model.modules():
        if isinstance(module, MoELayer) and type(module.experts) is ExpertBank:
            module.experts = ExpertParallelBank(module.experts, world)
    return expert_parameters(model)


def expert_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters held by ExpertParallelBanks (sharded over an EP group)."""
    return [f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, ExpertParallelBank)
            for p, _ in m.named_parameters(recurse=False)]


def reduce_expert_grads(model: nn.Module, world: World) -> None:
    """Sharded experts' gradients -> single-process gradients of the global mean loss (see module doc)."""
    grads = [p.grad for m in model.modules() if isinstance(m, ExpertParallelBank) for p in m.parameters()
             if p.grad is not None]
    for grad in grads:
        if world.expert_dp_group is not None:
            dist.all_reduce(grad, group=world.expert_dp_group)
        grad.div_(world.size)
