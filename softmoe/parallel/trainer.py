"""DistributedTrainer: the Trainer composed with a distributed forward and global statistics, with sharded
checkpoints and rank 0 owning the run directory. Every rank runs the same loop on its shard of each global batch.

The Trainer takes the two distributed parts as functions: `parallelize_for(world, config)` wraps the model (expert
parallel, then DDP or FSDP2; the Trainer builds the optimizer once, after it) and `reduce_over_ranks` averages the
logged values. What stays a subclass is who owns the run directory: rank 0 locks and claims it, every rank
restores the same checkpoint and saves its shards.

What differs from one process, and why the result is the same (to float round-off):
    - data: rank r reads rows [r B/n, (r+1) B/n) of the global micro-batch (softmoe/parallel/data.py);
    - gradients: DDP / FSDP2 average them over ranks; sharded experts are reduced by
      `reduce_expert_grads`; the mean of per-rank mean losses is the global mean (equal shard sizes);
    - routing statistics: the forward runs inside `global_counts`, so balance losses, loads and the
      controllers use the global batch's counts; logged losses and layer summaries are rank means;
    - Budget k_l, the loss-free bias, ReMoE's lambda and the count controllers' thresholds stay identical on
      every rank: the first is a data-parallel parameter, the others move by the same global counts (the
      layers return them summed over the ranks);
    - validation: every rank evaluates the same full validation batches;
    - checkpoints: torch.distributed.checkpoint, sharded, atomic (softmoe/parallel/checkpoint.py).
Rank 0 alone writes the run directory's files (config, metrics, summary, the checkpoint manifest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from softmoe.model import GPT, DecoderOutput
from softmoe.parallel import checkpoint as dist_checkpoint
from softmoe.parallel.data import ShardedData
from softmoe.parallel.expert import ExpertParallelBank, reduce_expert_grads
from softmoe.parallel.stats import counts_summed_over, global_layer_summary, mean_over_ranks
from softmoe.parallel.world import World
from softmoe.parallel.wrap import parallelize
from softmoe.routing.losses import global_counts
from softmoe.train.checkpoint import CheckpointError, latest_good_checkpoint
from softmoe.train.config import RunConfig
from softmoe.train.loop import Parallelized, Trainer, TrainingAborted, TrainResult
from softmoe.train.rundir import RunDirError

__all__ = ["DistributedTrainer", "parallelize_for", "reduce_over_ranks"]


class DistributedTrainer(Trainer):
    """Trainer for one rank of a torchrun launch (the process group is already initialised: `init_world`).

    Args:
        config: the run config; `config.parallel.data` is "ddp" or "fsdp".
        world: this rank's World.
        report: message sink (rank 0 only; other ranks are silent).
    """

    def __init__(self, config: RunConfig, world: World, report: Callable[[str], None] | None = None):
        if not config.parallel.distributed:
            raise ValueError("DistributedTrainer needs parallel.data=ddp or fsdp")
        if not world.is_main:  # one progress bar and one TensorBoard writer per run
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, progress=False,
                                                                           tensorboard=False))
        self.world = world
        self.writes_run_files = world.is_main
        super().__init__(config, report=report if world.is_main else _silent,
                         parallelize=parallelize_for(world, config), reduce=reduce_over_ranks)
        self.data = ShardedData(self.data, world.rank, world.size, world.device)
        self.device = world.device  # this rank's device (train.device is for one-process runs)

    # ---- hooks ----

    def _skip_uncomputable(self, step: int, lr: float, reason: str):
        # The other ranks may be inside this step's collectives: this rank cannot skip alone. It stops (torchrun
        # then ends the others) with its reason; the run directory keeps its earlier checkpoints.
        raise TrainingAborted(f"aborting at step {step} on rank {self.world.rank}: {reason}: the weights diverged, "
                              f"is train.lr={self.config.train.lr:g} far too high?")

    # ---- the run directory and checkpoints ----

    @contextlib.contextmanager
    def _run_lock(self):
        """Rank 0 holds the run directory's lock; every rank learns whether it got it."""
        with contextlib.ExitStack() as held:
            error = None
            if self.world.is_main:
                try:
                    held.enter_context(super()._run_lock())
                except RunDirError as err:
                    error = err
            _raise_on_every_rank(error)
            yield

    def _start(self, mode: str) -> TrainResult | None:
        """Rank 0 claims the run directory and picks the checkpoints; every rank restores the same one."""
        claim: list = [None, []]
        if self.world.is_main:
            try:
                good, older = self._claim(mode)
                claim = [None, [] if good is None else [good, *older]]
            except (RunDirError, CheckpointError) as err:
                claim = [err, []]
        dist.broadcast_object_list(claim, src=0)
        if claim[0] is not None:  # rank 0's error, raised on every rank so that all leave together
            claim[0].every_rank = True  # rank 0 alone reports it (softmoe/cli/train.py)
            raise claim[0]
        paths = claim[1]
        return None if not paths else self._resume(paths[0], iter(paths[1:]))

    @contextlib.contextmanager
    def _stop_on_signal(self):
        """No stop-after-this-step on a signal: the ranks would stop at different steps. torchrun ends every
        worker on SIGINT / SIGTERM; `--resume` continues from the last checkpoint."""
        self.stop_requested = None
        yield

    def save(self) -> Path:
        path = dist_checkpoint.save(self, self.run_dir / "checkpoints")
        self.saved_step = self.step
        return path

    def restore(self, path: Path | None = None) -> Path | None:
        path = path or latest_good_checkpoint(self.run_dir / "checkpoints", self.report)
        return None if path is None else dist_checkpoint.restore(self, path)


def parallelize_for(world: World, config: RunConfig) -> Callable[[GPT], Parallelized]:
    """The Trainer's `parallelize` for this rank: model -> `Parallelized` (moved to the rank's device, experts
    sharded over the EP group, the rest wrapped by DDP or FSDP2: softmoe/parallel/wrap.py)."""

    def parallelize_model(model: GPT) -> Parallelized:
        model.to(world.device)
        wrapped, expert_names = parallelize(model, world, config.parallel, config.train.precision)
        return Parallelized(forward=_forward_fn(wrapped, config.parallel.data == "ddp"),
                            clip_grad_norm=functools.partial(clip_grad_norm, model, world, frozenset(expert_names)),
                            num_params=num_params(model))

    return parallelize_model


def _forward_fn(wrapped: torch.nn.Module, ddp: bool) -> Callable[[torch.Tensor, torch.Tensor, bool], DecoderOutput]:
    """`Parallelized.forward` of a wrapped model: routing counts summed over the ranks (`global_counts`)."""
    sum_fn = counts_summed_over()

    def forward(idx_BT: torch.Tensor, targets_BT: torch.Tensor, last_micro: bool) -> DecoderOutput:
        if ddp:  # gradients are all-reduced on the last micro-batch of a step only (DDP's no_sync otherwise)
            wrapped.require_backward_grad_sync = last_micro
        with global_counts(sum_fn):
            return wrapped(idx_BT, targets_BT)

    return forward


def reduce_over_ranks(values: list[float], layers: list[dict]) -> tuple[list[float], list[dict]]:
    """The Trainer's `reduce`: the step's logged sums and routing summary averaged over the ranks (counts summed)."""
    return mean_over_ranks(values), global_layer_summary(layers)


def clip_grad_norm(model: torch.nn.Module, world: World, expert_names: frozenset[str], max_norm: float) -> float:
    """Clip every rank's gradients to `max_norm` by the global norm (expert shards reduced first); returns it."""
    if expert_names:
        reduce_expert_grads(model, world)
    with_grad = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
    dense = [p for name, p in with_grad if name not in expert_names]
    experts = [p for name, p in with_grad if name in expert_names]
    norm_sq = _full(torch.nn.utils.get_total_norm([p.grad for p in dense])).double().square()
    if experts:  # each EP rank holds other experts: their squared norms add up over the EP group
        expert_sq = torch.nn.utils.get_total_norm([p.grad for p in experts]).double().square()
        dist.all_reduce(expert_sq, group=world.ep_group)
        norm_sq = norm_sq + expert_sq
    total = norm_sq.sqrt()
    if math.isfinite(max_norm):
        for params in (dense, experts):  # separately: FSDP2's DTensor gradients and plain expert shards
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.float())
    return total.item()


def num_params(model: torch.nn.Module) -> int:
    """The whole model's parameters: this rank's, plus the experts other EP ranks hold."""
    elsewhere = sum((m.num_experts_total - p.shape[0]) * p[0].numel() for m in model.modules()
                    if isinstance(m, ExpertParallelBank) for p in m.parameters())
    return model.num_params() + elsewhere


def _raise_on_every_rank(error: Exception | None) -> None:
    """Raise rank 0's error (or none) on every rank, so all leave together instead of waiting on each other."""
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        box[0].every_rank = True  # rank 0 alone reports it (softmoe/cli/train.py)
        raise box[0]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded norm) as its full value; a plain tensor unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _silent(_message: str) -> None:
    pass
