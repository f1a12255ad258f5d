"""DistributedTrainer: the single-process Trainer, with a distributed forward, global statistics and
sharded checkpoints. Every rank runs the same loop on its shard of each global batch.

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
import math
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from softmoe.model import DecoderOutput
from softmoe.parallel import checkpoint as dist_checkpoint
from softmoe.parallel.data import ShardedData
from softmoe.parallel.expert import ExpertParallelBank, reduce_expert_grads
from softmoe.parallel.stats import counts_summed_over, global_layer_summary, mean_over_ranks
from softmoe.parallel.world import World
from softmoe.parallel.wrap import parallelize
from softmoe.routing.losses import global_counts
from softmoe.train.checkpoint import CheckpointError, latest_good_checkpoint
from softmoe.train.config import RunConfig
from softmoe.train.loop import Trainer, TrainingAborted, TrainResult
from softmoe.train.rundir import RunDirError

__all__ = ["DistributedTrainer"]


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
        super().__init__(config, report=report if world.is_main else _silent)
        self.data = ShardedData(self.data, world.rank, world.size, world.device)
        self.device = world.device  # this rank's device (train.device is for one-process runs)
        self.model.to(world.device)
        # The optimizer is rebuilt after wrapping: FSDP2 replaces the parameters by sharded DTensors.
        self.wrapped, self.expert_names = parallelize(self.model, world, config.parallel, config.train.precision)
        t = config.train
        from softmoe.train.optim import build_optimizer

        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps,
                                         t.budget_lr_mult)
        self._sum = counts_summed_over()

    # ---- hooks ----

    def _forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor, last_micro: bool) -> DecoderOutput:
        if self.config.parallel.data == "ddp":
            # Gradients are all-reduced on the last micro-batch of a step only (DDP's no_sync otherwise).
            self.wrapped.require_backward_grad_sync = last_micro
        with global_counts(self._sum):
            return self.wrapped(idx_BT, targets_BT)

    def _global_values(self, loss_sum: float, aux_sum: float, layers: list[dict]
                       ) -> tuple[float, float, list[dict]]:
        loss_sum, aux_sum = mean_over_ranks([loss_sum, aux_sum])
        return loss_sum, aux_sum, global_layer_summary(layers)

    def _clip_grad_norm(self, max_norm: float) -> float:
        if self.expert_names:
            reduce_expert_grads(self.model, self.world)
        with_grad = [(name, p) for name, p in self.model.named_parameters() if p.grad is not None]
        dense = [p for name, p in with_grad if name not in self.expert_names]
        experts = [p for name, p in with_grad if name in self.expert_names]
        norm_sq = _full(torch.nn.utils.get_total_norm([p.grad for p in dense])).double().square()
        if experts:  # each EP rank holds other experts: their squared norms add up over the EP group
            expert_sq = torch.nn.utils.get_total_norm([p.grad for p in experts]).double().square()
            dist.all_reduce(expert_sq, group=self.world.ep_group)
            norm_sq = norm_sq + expert_sq
        total = norm_sq.sqrt()
        if math.isfinite(max_norm):
            for params in (dense, experts):  # separately: FSDP2's DTensor gradients and plain expert shards
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.float())
        return total.item()

    def _skip_uncomputable(self, step: int, lr: float, reason: str):
        # The other ranks may be inside this step's collectives: this rank cannot skip alone. It stops (torchrun
        # then ends the others) with its reason; the run directory keeps its earlier checkpoints.
        raise TrainingAborted(f"aborting at step {step} on rank {self.world.rank}: {reason}: the weights diverged, "
                              f"is train.lr={self.config.train.lr:g} far too high?")

    def num_params(self) -> int:
        """The whole model's parameters: this rank's, plus the experts other EP ranks hold."""
        elsewhere = sum((m.num_experts_total - p.shape[0]) * p[0].numel() for m in self.model.modules()
                        if isinstance(m, ExpertParallelBank) for p in m.parameters())
        return self.model.num_params() + elsewhere

    # ---- the run directory and checkpoints ----

    @contextlib.contextmanager
    def _run_lock(self):
        """Rank 0 holds the run directory's lock; every rank learns whether it got it."""
        lock = super()._run_lock() if self.world.is_main else contextlib.nullcontext()
        error = None
        try:
            lock.__enter__()
        except RunDirError as err:
            error = err
        _raise_on_every_rank(error)
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

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
