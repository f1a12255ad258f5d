"""The training loop: setup, step (grad accumulation, clipping, non-finite guard), eval, checkpoint, resume.

One optimizer step at step s consumes micro-batches s * grad_accum + m (m < grad_accum) of the train
loader, and the loader is a pure function of (seed, index). With the learning rate a pure function of
s, a resume only needs the weights, the optimizer moments, the RNG state and s: it continues exactly.

Routing state flows through return values: the model returns aux losses and per-layer stats in its
DecoderOutput, the step returns them in a StepStats, and the loop logs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import yaml

from softmoe.common.atomic import atomic_write_text
from softmoe.common.precision import autocast_context, module_device, resolve_device
from softmoe.common.revision import code_revision
from softmoe.model import GPT, DecoderOutput
from softmoe.ops.compile import compile_model
from softmoe.routing.base import NonFiniteLogits
from softmoe.train import controllers, runtime
from softmoe.train.checkpoint import (
    CheckpointError,
    good_checkpoints,
    latest_good_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from softmoe.train.config import RunConfig
from softmoe.train.data import TrainData, open_data
from softmoe.routing.diagnostics import RoutingCounts
from softmoe.train.metrics import (MetricsWriter, mean_active_experts, read_metrics, routing_summary, train_ae,
                                   with_load_window)
from softmoe.train.optim import build_optimizer
from softmoe.train.rundir import (
    RunDirError,
    RunLock,
    check_ownership,
    clean_stale_temp,
    empty_run_dir,
    resolved_dict,
    trajectory_diff,
)
from softmoe.train.schedule import lr_at

__all__ = ["Trainer", "TrainResult", "StepStats", "TrainingAborted", "Parallelized", "one_process", "this_process",
           "evaluate", "read_revisions", "REVISIONS"]

SIGTERM_REPEAT_S = 2.0  # a second SIGTERM sooner than this after the first is the same stop request (see below)


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps, or a validation without a finite loss (diverged weights: e.g. a
    learning rate far too high)."""


def _non_finite(**values: float) -> str:
    """'non-finite grad_norm=nan (loss=5.95, aux_loss=0.01)': the quantities that are not finite first."""
    bad = [f"{name}={value:g}" for name, value in values.items() if not math.isfinite(value)]
    good = [f"{name}={value:.4g}" for name, value in values.items() if math.isfinite(value)]
    return f"non-finite {', '.join(bad)}" + (f" ({', '.join(good)})" if good else "")


@dataclass
class StepStats:
    """What one optimizer step produced (losses averaged over micro-batches)."""

    loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    skipped: bool
    layers: list[dict] = field(default_factory=list)  # routing summary of the last micro-batch
    reason: str = ""  # why a skipped step could not be computed (empty: a non-finite loss or gradient)


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished (or stopped) training session; also written to <run_dir>/summary.json."""

    run_dir: str
    step: int
    train_loss: float | None
    val_loss: float | None
    tokens_per_sec: float | None
    mean_active_experts: float | None  # Infer AE: realized active experts per token in eval mode, final val
    skipped_steps: int
    checkpoint: str | None
    num_params: int
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM (checkpointed; continue with --resume)
    train_ae: float | None = None  # Train AE: realized active experts per token in training mode (last 20%)
    train_ae_per_layer: list | None = None
    infer_ae_per_layer: list | None = None  # per MoE layer, eval mode, final val
    # Routing diagnostics per MoE layer (train/metrics.py DIAGNOSTIC_KEYS), of the final validation pass
    # (eval mode, the load over all its batches): the nominal k (k_l: soft mass), logit spread, kept weight, load.
    k_per_layer: list | None = None
    logit_spread_per_layer: list | None = None
    weight_sum_per_layer: list | None = None
    dead_fraction_per_layer: list | None = None
    load_max_over_mean_per_layer: list | None = None
    load_cv_per_layer: list | None = None


@dataclass(frozen=True)
class Parallelized:
    """The model as this process trains it: what a Trainer's `parallelize` function makes of the GPT.

    forward(idx_BT, targets_BT, last_micro) -> DecoderOutput: one micro-batch (B, T) (`last_micro`: the last of the
        step, where a data-parallel wrapper reduces the gradients);
    clip_grad_norm(max_norm) -> the total gradient norm before clipping (over every rank's shard);
    num_params: parameters of the whole model (the tied head counted once; experts held by other ranks too).
    `one_process` is the single-process one; softmoe/parallel/trainer.py makes the DDP / FSDP2 / expert-parallel one.
    """

    forward: Callable[[torch.Tensor, torch.Tensor, bool], DecoderOutput]
    clip_grad_norm: Callable[[float], float]
    num_params: int


def one_process(model: GPT, compile: bool = False) -> Parallelized:
    """`Parallelized` for one process: the model's forward (torch.compile'd with `compile`; the compiled forward
    shares the model's parameters and state_dict keys, so checkpoints are unchanged), no (B, S, V) logits (the
    loss comes from the fused chunked head + cross-entropy, model/loss.py), plain gradient clipping."""
    forward_fn = compile_model(model, fullgraph=False) if compile else model

    def forward(idx_BT: torch.Tensor, targets_BT: torch.Tensor, last_micro: bool) -> DecoderOutput:
        return forward_fn(idx_BT, targets_BT, return_logits=False)

    def clip_grad_norm(max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()

    return Parallelized(forward=forward, clip_grad_norm=clip_grad_norm, num_params=model.num_params())


Reduce = Callable[[list[float], list[dict]], tuple[list[float], list[dict]]]


def this_process(values: list[float], layers: list[dict]) -> tuple[list[float], list[dict]]:
    """The `reduce` of one process: the step's logged sums and routing summary as they are."""
    return values, layers


@torch.no_grad()
def evaluate(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             precision: str = "fp32") -> tuple[float, list[dict]]:
    """Token-weighted mean cross-entropy over `batches`, and the routing summary of the last batch (its expert
    load numbers over all batches).

    Args:
        model: the decoder (its training/eval mode is restored afterwards); batches are moved to its device.
        batches: (idx_BT, targets_BT) pairs; targets equal to -100 are not scored.
        precision: "fp32" or "bf16" (autocast on the model's device).
    """
    was_training = model.training
    model.eval()
    device = module_device(model)
    total, count, out = 0.0, 0, None
    window = RoutingCounts()  # the load over every batch, not the last one's
    for idx_BT, targets_BT in batches:
        idx_BT, targets_BT = to_device(idx_BT, device), to_device(targets_BT, device)
        with autocast_context(precision, device):
            out = model(idx_BT, targets_BT, return_logits=False)
        n = int((targets_BT != -100).sum())
        total, count = total + out.loss.item() * n, count + n
        window.add(out.routing)
    layers = [] if out is None else with_load_window(routing_summary(out.routing), window)
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the batches contain no scored targets")
    return total / count, layers


class Trainer:
    """Builds model, optimizer and data from a RunConfig; `fit` trains, evaluates and checkpoints.

    Args:
        config: the run config.
        report: message sink (default: printed above the progress bar).
        parallelize: model -> `Parallelized` (default `one_process`): wraps the model for this process (DDP, FSDP2,
            expert parallel: softmoe/parallel/trainer.py). Called once, before the optimizer is built (FSDP2
            replaces the parameters by sharded DTensors).
        reduce: ([loss sum, aux sum], routing summary) -> the same over every rank (default `this_process`).
    The methods marked "hook" are the single-process behaviour of the run directory and checkpoints that
    softmoe.parallel.DistributedTrainer overrides for a multi-process run (rank 0 owns the run directory,
    sharded checkpoints).
    """

    writes_run_files = True  # False on the non-zero ranks of a distributed run: rank 0 alone writes the run dir

    def __init__(self, config: RunConfig, report: Callable[[str], None] | None = None,
                 parallelize: Callable[[GPT], Parallelized] | None = None, reduce: Reduce = this_process):
        self.config = config
        self.run_dir = config.train.run_dir
        self.report = report or _tqdm_write
        runtime.bound_kernel_caches()  # before the first matmul: MoE shapes vary, the caches would grow
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed)
        self.data: TrainData = open_data(config.data)
        if self.data.vocab_size > config.model.vocab_size:
            raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the dataset's "
                             f"tokenizer vocabulary ({self.data.vocab_size})")
        t = config.train
        _check_eval_batches(t.eval_batches, self.data)
        self.device = resolve_device(t.device, "train.device")
        self.model = GPT(config.model, activation_checkpointing=t.activation_checkpointing).to(self.device)
        self.ae_target = _ae_target(t, self.model)
        self.load_window = RoutingCounts()  # routed pairs per expert since the last train record (diagnostics)
        self.parallelized = parallelize(self.model) if parallelize else one_process(self.model, t.compile)
        self.reduce = reduce
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps,
                                         t.budget_lr_mult)
        self.step = 0
        self.saved_step: int | None = None  # step of the newest checkpoint of this session
        self.bad_steps = 0  # consecutive skipped steps
        self.skipped_total = 0
        # The train-log window since the last record: [loss sum, good steps, steps, seconds]. Checkpointed, so a
        # resume between two log steps writes the same record as the uninterrupted run.
        self.window: list = [0.0, 0, 0, 0.0]
        self.stop_requested: str | None = None  # the signal that asked to stop after the current step

    # ---- one step ----

    def _set_lr(self, step: int) -> float:
        t = self.config.train
        lr = lr_at(step, t.lr, t.warmup_steps, t.schedule_end, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        return lr

    def train_step(self, step: int, summarize: bool = True) -> StepStats:
        """Forward/backward over grad_accum micro-batches, clip, and step unless anything is non-finite.

        `summarize`: read the routing summary (StepStats.layers) of the last micro-batch; it costs host syncs
        (a few per MoE layer), so the loop asks for it on log steps only. Otherwise a step reads the device
        twice: the loss sums and the gradient norm (plus the one sync per MoE layer that sizes its dispatch).
        """
        t = self.config.train
        self.model.train()
        lr = self._set_lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # [loss, aux], read once after the loop
        counts = RoutingCounts()  # per layer: routed pairs per expert and real tokens of the step
        try:
            for micro in range(t.grad_accum):
                idx_BT, targets_BT = self.data.train_batch(step * t.grad_accum + micro)
                idx_BT, targets_BT = to_device(idx_BT, self.device), to_device(targets_BT, self.device)
                with autocast_context(t.precision, self.device):
                    out = self.parallelized.forward(idx_BT, targets_BT, micro == t.grad_accum - 1)
                (out.objective / t.grad_accum).backward()
                sums += torch.stack([out.loss.detach().double(), out.aux_loss.detach().double()])
                counts.add(out.routing)  # what the controllers read after the step: return values, no module state
                self.load_window.add(out.routing)
        except NonFiniteLogits as err:  # diverged weights (lr far too high): the CPU routers' check saw them first
            return self._skip_uncomputable(step, lr, str(err).split(":")[0])
        loss_sum, aux_sum = sums.tolist()
        layers = with_load_window(routing_summary(out.routing), self.load_window) if summarize else []
        (loss_sum, aux_sum), layers = self.reduce([loss_sum, aux_sum], layers)
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = self.parallelized.clip_grad_norm(max_norm)
        finite = math.isfinite(loss_sum) and math.isfinite(aux_sum) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            # Never let NaN/inf reach the weights: drop this step's gradients instead.
            self.optimizer.zero_grad(set_to_none=True)
        # ReMoE's lambda, the loss-free bias, the thresholds / K of the count controllers; a skipped step moves none
        controllers.step(self.model, counts, update=finite, ae_target=self.ae_target)
        return StepStats(loss=loss_sum / t.grad_accum, aux_loss=aux_sum / t.grad_accum, grad_norm=grad_norm,
                         lr=lr, skipped=not finite, layers=layers)

    # ---- hooks (single process; see softmoe/parallel/trainer.py) ----

    def _skip_uncomputable(self, step: int, lr: float, reason: str) -> StepStats:
        """Hook: a step whose forward could not be computed is skipped like a non-finite one (weights unchanged,
        counted against train.max_bad_steps; no controller moves)."""
        self.optimizer.zero_grad(set_to_none=True)
        nan = math.nan
        return StepStats(loss=nan, aux_loss=nan, grad_norm=nan, lr=lr, skipped=True, reason=reason)

    def num_params(self) -> int:
        """Parameters of the whole model (the tied head counted once; every rank's experts)."""
        return self.parallelized.num_params

    def _guard(self, stats: StepStats, step: int) -> None:
        if not stats.skipped:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.skipped_total += 1
        what = stats.reason or _non_finite(loss=stats.loss, aux_loss=stats.aux_loss, grad_norm=stats.grad_norm)
        self.report(f"step {step}: {what}; step skipped, weights unchanged ({self.bad_steps} in a row)")
        if self.bad_steps > self.config.train.max_bad_steps:
            t = self.config.train
            raise TrainingAborted(f"aborting at step {step}: {self.bad_steps} consecutive non-finite steps "
                                  f"({what}; train.max_bad_steps={t.max_bad_steps}): the weights "
                                  f"diverged, is train.lr={t.lr:g} far too high? Its earlier checkpoints are kept")

    # ---- checkpoints ----

    def _train_state(self) -> dict:
        """Step, RNG state, data position and log window of a checkpoint (`save` adds the optimizer state)."""
        return {
            "step": self.step,
            "rng_torch": torch.get_rng_state(),
            "data_position": self.data.train.state_dict(next_step=self.step * self.config.train.grad_accum),
            "skipped_total": self.skipped_total,
            "log_window": list(self.window),
            "load_window": self.load_window.state_dict(),
        }

    def save(self) -> Path:
        """Checkpoint the state after `self.step` completed steps."""
        train_state = {"optimizer": self.optimizer.state_dict(), **self._train_state()}
        meta = {"step": self.step, "config": resolved_dict(self.config)}
        self.saved_step = self.step
        return save_checkpoint(self.run_dir / "checkpoints", self.step, self.model.state_dict(), train_state, meta,
                               extra_files=self.data.checkpoint_files(), keep_last=self.config.train.keep_last)

    def _latest(self) -> Path:
        return self.run_dir / "checkpoints" / f"step_{self.step:07d}"

    def restore(self, path: Path | None = None) -> Path | None:
        """Load checkpoint `path` (default: the newest good one of this run; rejected ones are reported).

        Returns the checkpoint used, None if there is none. RunDirError if its run config differs from
        this trainer's in a setting that changes the trajectory (the keys are named).
        """
        path = path or latest_good_checkpoint(self.run_dir / "checkpoints", self.report)
        if path is None:
            return None
        model_state, train_state, meta = load_checkpoint(path)
        self._check_resumable(meta, train_state, path)
        try:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(train_state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # written wrong, yet its hashes match
            raise CheckpointError(f"{path}: its state does not load ({' '.join(str(err).split())[:200]})") from None
        self._resume_position(train_state, path)
        return path

    def _check_resumable(self, meta: dict, train_state: dict, path: Path,
                         required: tuple[str, ...] = ("optimizer", "step", "rng_torch", "data_position",
                                                      "skipped_total")) -> None:
        """CheckpointError for an unreadable config or missing train state; RunDirError for other settings."""
        try:
            changed = trajectory_diff(meta["config"], self.config)
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path / 'meta.json'}: unreadable run config ({err})") from None
        missing = [k for k in required if not isinstance(train_state, dict) or k not in train_state]
        if missing:
            raise CheckpointError(f"{path / 'train_state.pt'}: missing {missing}")
        if changed:
            raise RunDirError(f"{path}: the checkpoint was trained with other settings {changed}; resume with the "
                              f"run's own config (softmoe train --resume reads it) or use another train.name")

    def _resume_position(self, train_state: dict, path: Path) -> None:
        """Restore the RNG, the step counters, the log window and the checked data position of a checkpoint."""
        try:
            torch.set_rng_state(train_state["rng_torch"])
        except (RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: its RNG state does not load ({' '.join(str(err).split())[:200]})") from None
        self.step = self.saved_step = train_state["step"]
        self.skipped_total = train_state["skipped_total"]
        self.window = list(train_state.get("log_window", [0.0, 0, 0, 0.0]))
        self.load_window.load_state_dict(train_state.get("load_window", {}), self.device)
        # The loader checks the saved position was taken on the same data with the same windows.
        next_batch = self.data.train.load_state_dict(train_state["data_position"])
        if next_batch != self.step * self.config.train.grad_accum:
            raise ValueError(f"{path}: data position {next_batch} does not match step {self.step} x grad_accum "
                             f"{self.config.train.grad_accum}; resume with the same train.grad_accum")

    # ---- the loop ----

    def _start(self, mode: str) -> TrainResult | None:
        """Claim the run directory for `mode` (see train/rundir.py) and restore; the saved result if finished."""
        good, candidates = self._claim(mode)
        return None if good is None else self._resume(good, candidates)

    def _claim(self, mode: str) -> tuple[Path | None, Iterator[Path]]:
        """Clean and check the run directory for `mode`; (the checkpoint to resume or None, older ones)."""
        clean_stale_temp(self.run_dir, self.report)
        if mode == "overwrite":
            empty_run_dir(self.run_dir)
        candidates = good_checkpoints(self.run_dir / "checkpoints", self.report)
        good = next(candidates, None) if mode in ("resume", "auto") else None
        check_ownership(self.config, mode, good is not None)
        metrics = self.run_dir / "metrics.jsonl"
        if good is not None and not metrics.is_file():  # every session creates it: someone deleted it
            raise RunDirError(f"{metrics} is missing, but the run has checkpoints (newest {good.name}): resuming "
                              f"would go on with the run's history gone; restore the file, or create an empty one "
                              f"to continue without it")
        if good is None:  # a fresh start: nothing of an earlier attempt may mix into this run's logs
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(resolved_dict(self.config), sort_keys=False))
            for name in ("metrics.jsonl", "summary.json", REVISIONS):
                (self.run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        return good, candidates

    def _resume(self, good: Path, candidates: Iterator[Path]) -> TrainResult | None:
        """Restore `good` (falling back to older `candidates` that load); the saved result if finished."""
        while True:  # a checkpoint that verifies but does not load: fall back to the previous one
            try:
                self.restore(good)
                break
            except CheckpointError as err:
                self.report(f"checkpoint rejected: {err}; falling back to the previous one")
                good = next(candidates, None)
                if good is None:
                    raise RunDirError(f"{self.run_dir}: no checkpoint can be loaded; nothing was changed; pass "
                                      f"--overwrite to start the run again") from None
        if self.writes_run_files:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(resolved_dict(self.config), sort_keys=False))
        finished = _read_summary(self.run_dir)
        if self.step >= self.config.train.steps and finished is not None and finished.step == self.step:
            self.report(f"{self.run_dir}: already trained to step {self.step}; nothing to do")
            return finished
        if self.step >= self.config.train.steps:  # finished, but summary.json is missing or unreadable
            rebuilt = self._summary_from_metrics(good)
            if rebuilt is not None:
                return rebuilt
        self.report(f"resumed from {good} at step {self.step}")
        t = self.config.train
        # An extended run (it had finished at this step) keeps its final records; an interrupted one drops the
        # off-schedule records its stop added, so its curves equal the uninterrupted run's.
        extended = finished is not None and finished.step == self.step
        if self.writes_run_files:
            MetricsWriter.truncate_after(self.run_dir, self.step, keep=lambda r: extended or _on_schedule(r, t))
        return None

    def _summary_from_metrics(self, checkpoint: Path) -> TrainResult | None:
        """A finished run's summary.json written again from metrics.jsonl (its final validation record), without
        evaluating or logging anything again; None when that record is missing (then the run validates once)."""
        val = [r for r in read_metrics(self.run_dir, "val") if r.get("step") == self.step]
        if not val:
            return None
        layers = val[-1].get("layers") or []
        train_loss, tok_per_sec = _logged_train(self.run_dir, self.step)
        result = TrainResult(run_dir=str(self.run_dir), step=self.step, train_loss=train_loss,
                             val_loss=val[-1]["loss"], tokens_per_sec=tok_per_sec,
                             mean_active_experts=mean_active_experts(layers), skipped_steps=self.skipped_total,
                             checkpoint=str(checkpoint), num_params=self.num_params(),
                             **_ae_fields(self.run_dir, layers))
        if self.writes_run_files:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(result.__dict__, indent=2) + "\n")
        self.report(f"{self.run_dir}: already trained to step {self.step}; summary.json was missing or unreadable "
                    f"and is written again from metrics.jsonl (train loss and tok/s: the last logged window)")
        return result

    def _run_lock(self):
        """Hook: the run directory's lock for the session (RunLock: one trainer at a time)."""
        return RunLock(self.run_dir, self.report)

    def fit(self, resume: bool | str = False, stop_after: int | None = None, overwrite: bool = False) -> TrainResult:
        """Train to `train.steps` (or stop after step `stop_after`), evaluating and checkpointing on the way.

        Args:
            resume: True: continue from the newest good checkpoint of this run (an error if there is none);
                "auto": continue when there is a checkpoint, else start; False: a new run.
            stop_after: end the session once this many steps are done (checkpointed), as if interrupted.
            overwrite: delete whatever the run directory holds and start again.
        Ctrl-C / SIGTERM stop after the current step with a checkpoint (`interrupted=True` in the result).
        """
        t = self.config.train
        mode = "overwrite" if overwrite else "auto" if resume == "auto" else "resume" if resume else "new"
        with self._run_lock():
            finished = self._start(mode)
            if finished is not None:
                return finished
            if self.writes_run_files:  # the code revision of every training session of this run
                record_revision(self.run_dir, self.step)
            if t.warmup_steps > t.schedule_end and self.writes_run_files:  # legal (a smoke run): say what it means
                self.report(f"note: train.warmup_steps={t.warmup_steps} > train.steps={t.schedule_end}: the learning "
                            f"rate rises to {t.schedule_end / t.warmup_steps:.2g} x train.lr and never decays")
            end = t.steps if stop_after is None else min(stop_after, t.steps)
            writer = MetricsWriter(self.run_dir, tensorboard=t.tensorboard, purge_step=self.step or None,
                                   report=self.report, enabled=self.writes_run_files)
            try:
                with self._stop_on_signal():
                    train_loss, tok_per_sec = self._run(writer, end)
                    if self.stop_requested:
                        val_loss, val_layers = None, []
                    else:
                        val_loss, val_layers = self._validate(writer)
                    ckpt = self.save() if self.saved_step != self.step else self._latest()
            finally:
                writer.close()
            if train_loss is None and self.step >= t.steps:  # no step this session (a finished run's summary lost)
                train_loss, tok_per_sec = _logged_train(self.run_dir, self.step)
            result = TrainResult(run_dir=str(self.run_dir), step=self.step, train_loss=train_loss,
                                 val_loss=val_loss, tokens_per_sec=tok_per_sec,
                                 mean_active_experts=mean_active_experts(val_layers),
                                 skipped_steps=self.skipped_total, checkpoint=str(ckpt),
                                 num_params=self.num_params(), interrupted=self.stop_requested is not None,
                                 **_ae_fields(self.run_dir, val_layers))
            if not result.interrupted and self.writes_run_files:
                atomic_write_text(self.run_dir / "summary.json", json.dumps(result.__dict__, indent=2) + "\n")
        return result

    @contextlib.contextmanager
    def _stop_on_signal(self):
        """While training: the first Ctrl-C / SIGTERM asks to stop after the current step (and checkpoint),
        a second one aborts at once. A SIGTERM within SIGTERM_REPEAT_S of a first SIGTERM is the same request
        delivered twice (killing the process group of `softmoe compare --jobs N` reaches a worker directly and
        again as its parent-death signal), not a second one. Only the main thread can own signal handlers;
        elsewhere nothing changes."""
        self.stop_requested = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        first_sigterm_at = None

        def handler(signum, frame):
            nonlocal first_sigterm_at
            if signum == signal.SIGTERM and first_sigterm_at is not None and \
                    time.monotonic() - first_sigterm_at < SIGTERM_REPEAT_S:
                return
            if self.stop_requested is not None:
                raise KeyboardInterrupt
            if signum == signal.SIGTERM:
                first_sigterm_at = time.monotonic()
            self.stop_requested = signal.Signals(signum).name
            self.report(f"{self.stop_requested}: stopping after step {self.step + 1} with a checkpoint "
                        f"(press Ctrl-C again to abort without one)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _run(self, writer: MetricsWriter, end: int) -> tuple[float | None, float | None]:
        """Steps self.step..end-1 with logging, periodic eval and checkpoints; returns last loss and tok/s."""
        t = self.config.train
        tokens_per_step = self.data.tokens_per_batch * t.grad_accum
        bar = _progress(t.progress, total=t.steps, initial=self.step)
        train_time, train_steps = 0.0, 0
        last_loss = None
        while self.step < end:
            tic = time.perf_counter()
            # The routing summary costs host syncs: read on log steps only (a signal's off-schedule stop record has
            # none; deciding from the step alone keeps every rank of a distributed run in the same collectives).
            log_step = (self.step + 1) % t.log_every == 0 or self.step + 1 == end
            stats = self.train_step(self.step, summarize=log_step)
            elapsed = time.perf_counter() - tic
            self._guard(stats, self.step)
            self.step += 1
            train_time, train_steps = train_time + elapsed, train_steps + 1
            w = self.window  # [loss sum, good steps, steps, seconds] since the last record
            w[2], w[3] = w[2] + 1, w[3] + elapsed
            if not stats.skipped:
                w[0], w[1], last_loss = w[0] + stats.loss, w[1] + 1, stats.loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(stats, tokens_per_step / elapsed), refresh=False)
            stopping = self.step == end or self.stop_requested is not None
            if self.step % t.log_every == 0 or stopping:
                mean_loss = w[0] / w[1] if w[1] else None  # None: all skipped
                writer.write(_train_record(self.step, stats, mean_loss, tokens_per_step * w[2] / max(w[3], 1e-9)))
                if self.step % t.log_every == 0:  # an off-schedule record (a stop) keeps the window running
                    self.window = [0.0, 0, 0, 0.0]
                    self.load_window.reset()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < end:
                self._validate(writer)  # fit evaluates at the end
            if t.ckpt_every and self.step % t.ckpt_every == 0:
                self.save()
            if self.stop_requested is not None:
                break
        if bar is not None:
            bar.close()
        tok_per_sec = tokens_per_step * train_steps / train_time if train_steps else None
        return last_loss, tok_per_sec

    def _validate(self, writer: MetricsWriter) -> tuple[float, list[dict]]:
        """Evaluate on the val split; TrainingAborted where the weights give no finite loss (a diverged run)."""
        t = self.config.train
        why = None
        try:
            val_loss, layers = evaluate(self.model, self.data.val_batches(t.eval_batches), t.precision)
        except NonFiniteLogits as err:  # weights finite but huge: the routers' check sees the logits first
            why = str(err).split(":")[0]
        else:
            if not math.isfinite(val_loss):
                why = f"val loss={val_loss:g}"
        if why is not None:
            raise TrainingAborted(f"aborting at step {self.step}: validation gave no finite loss ({why}): the "
                                  f"weights diverged, is train.lr={t.lr:g} far too high? Its earlier checkpoints "
                                  f"are kept")
        writer.write({"step": self.step, "split": "val", "loss": val_loss,
                      "active_experts_mean": mean_active_experts(layers), "layers": layers})
        self.report(f"step {self.step}: val loss {val_loss:.4f}")
        return val_loss, layers


REVISIONS = "revisions.jsonl"  # one line per training session: {"step": start step, "commit", "dirty", "version"}


def record_revision(run_dir: Path, step: int) -> None:
    """Append this session's code revision (softmoe/common/revision.py) to the run's revisions.jsonl."""
    line = json.dumps({"step": step, **code_revision()}) + "\n"
    with open(Path(run_dir) / REVISIONS, "a") as f:
        f.write(line)


def read_revisions(run_dir: Path) -> list[dict]:
    """The revisions of a run's training sessions ([] when none were recorded; torn lines skipped)."""
    path = Path(run_dir) / REVISIONS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`batch` on `device`; a CPU-to-CUDA copy goes through pinned memory, so it does not block the host."""
    if batch.device == device:
        return batch
    if device.type == "cuda" and batch.device.type == "cpu":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def _check_eval_batches(eval_batches: int, data: TrainData) -> None:
    """ValueError when the validation pass asks for more windows than the val split has distinct ones: beyond
    that, more batches only redraw the same windows (100,000 batches of a 1k-token split ran for minutes)."""
    val = data.val
    most = max(1, val.num_starts // val.batch_size)
    if eval_batches > most:
        raise ValueError(f"train.eval_batches={eval_batches} asks for {eval_batches * val.batch_size:,} validation "
                         f"windows, but the val split ({val.tokens.shape[0]:,} tokens) has only {val.num_starts:,} "
                         f"distinct windows of data.seq_len={val.seq_len}: use train.eval_batches <= {most}")


def _ae_target(t, model: GPT) -> controllers.ActiveExpertsTarget | None:
    """The active-experts controller of `train.ae_target` (None when 0); a model without the lever it moves is
    refused here, before the first step (`controllers.lever_update`)."""
    if not t.ae_target:
        return None
    target = controllers.ActiveExpertsTarget(t.ae_target, t.ae_rate, t.ae_lever, t.ae_k_max or None)
    controllers.lever_update(model, target)
    return target


def _ae_fields(run_dir: Path, val_layers: list[dict]) -> dict:
    """Train AE (training mode, from metrics.jsonl), the per-layer Infer AE (eval mode) and the final validation
    pass's routing diagnostics per layer, for summary.json."""
    ae, per_layer = train_ae(read_metrics(run_dir))

    def per(key: str) -> list | None:
        return [layer[key] for layer in val_layers if key in layer] or None

    return {"train_ae": ae, "train_ae_per_layer": per_layer or None, "infer_ae_per_layer": per("active_experts_mean"),
            "k_per_layer": per("k"), "logit_spread_per_layer": per("logit_spread"),
            "weight_sum_per_layer": per("weight_sum_mean"), "dead_fraction_per_layer": per("dead_fraction"),
            "load_max_over_mean_per_layer": per("load_max_over_mean"), "load_cv_per_layer": per("load_cv")}


def _on_schedule(record: dict, t) -> bool:
    """Whether an uninterrupted run writes `record` too (a stopped session adds a train and a val record at
    its last step; a resume drops them so the curves equal the uninterrupted run's)."""
    step = record.get("step")
    if not isinstance(step, int) or step >= t.steps:
        return True
    if record.get("split") == "val":
        return bool(t.eval_every) and step % t.eval_every == 0
    return step % t.log_every == 0


def _logged_train(run_dir: Path, step: int) -> tuple[float | None, float | None]:
    """(loss, tokens/s) of the last train record at or before `step` in metrics.jsonl; None where absent."""
    records = [r for r in read_metrics(run_dir, "train") if isinstance(r.get("step"), int) and r["step"] <= step]
    if not records:
        return None, None
    return records[-1].get("loss"), records[-1].get("tokens_per_sec")


def _read_summary(run_dir: Path) -> TrainResult | None:
    """The summary.json of a finished session, or None when missing or unreadable."""
    try:
        raw = json.loads((run_dir / "summary.json").read_text())
        fields = {f for f in TrainResult.__dataclass_fields__}
        return TrainResult(**{k: v for k, v in raw.items() if k in fields})
    except (OSError, ValueError, TypeError):
        return None


def _train_record(step: int, stats: StepStats, mean_loss: float | None, tok_per_sec: float) -> dict:
    return {"step": step, "split": "train", "loss": mean_loss, "aux_loss": stats.aux_loss, "lr": stats.lr,
            "grad_norm": stats.grad_norm, "tokens_per_sec": tok_per_sec,
            "active_experts_mean": mean_active_experts(stats.layers), "layers": stats.layers}


def _postfix(stats: StepStats, tok_per_sec: float) -> dict:
    post = {"loss": f"{stats.loss:.3f}", "tok/s": f"{tok_per_sec:.0f}"}
    active = mean_active_experts(stats.layers)
    if active is not None:
        post["AE"] = f"{active:.2f}"
    return post


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)  # None: off unless a TTY


def _tqdm_write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)  # prints above an active progress bar instead of through it

