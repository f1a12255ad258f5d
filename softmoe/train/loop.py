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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import yaml

from softmoe.data.io import atomic_write_text
from softmoe.model import GPT
from softmoe.train import controllers
from softmoe.train.checkpoint import latest_good_checkpoint, load_checkpoint, save_checkpoint
from softmoe.train.config import RunConfig, same_config
from softmoe.train.data import TrainData, open_data
from softmoe.train.metrics import MetricsWriter, mean_active_experts, routing_summary
from softmoe.train.optim import build_optimizer
from softmoe.train.schedule import lr_at

__all__ = ["Trainer", "TrainResult", "StepStats", "autocast_context", "evaluate"]


@dataclass
class StepStats:
    """What one optimizer step produced (losses averaged over micro-batches)."""

    loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    skipped: bool
    layers: list[dict] = field(default_factory=list)  # routing summary of the last micro-batch


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished (or stopped) training session; also written to <run_dir>/summary.json."""

    run_dir: str
    step: int
    train_loss: float | None
    val_loss: float | None
    tokens_per_sec: float | None
    mean_active_experts: float | None
    skipped_steps: int
    checkpoint: str | None
    num_params: int


def autocast_context(precision: str):
    # bf16 autocast on CPU; the model keeps its budget and the layers keep routing in fp32.
    if precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             precision: str = "fp32") -> tuple[float, list[dict]]:
    """Token-weighted mean cross-entropy over `batches`, and the routing summary of the last batch.

    Args:
        model: the decoder (its training/eval mode is restored afterwards).
        batches: (idx_BT, targets_BT) pairs; targets equal to -100 are not scored.
        precision: "fp32" or "bf16".
    """
    was_training = model.training
    model.eval()
    total, count, layers = 0.0, 0, []
    for idx_BT, targets_BT in batches:
        with autocast_context(precision):
            out = model(idx_BT, targets_BT)
        n = int((targets_BT != -100).sum())
        total, count = total + out.loss.item() * n, count + n
        layers = routing_summary(out.routing, out.k_L)
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the batches contain no scored targets")
    return total / count, layers


class Trainer:
    """Builds model, optimizer and data from a RunConfig; `fit` trains, evaluates and checkpoints."""

    def __init__(self, config: RunConfig, report: Callable[[str], None] | None = None):
        self.config = config
        self.run_dir = config.train.run_dir
        self.report = report or _tqdm_write
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed)
        self.data: TrainData = open_data(config.data)
        if self.data.vocab_size > config.model.vocab_size:
            raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the dataset's "
                             f"tokenizer vocabulary ({self.data.vocab_size})")
        self.model = GPT(config.model)
        t = config.train
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps,
                                         t.budget_lr_mult)
        self.step = 0
        self.saved_step: int | None = None  # step of the newest checkpoint of this session
        self.bad_steps = 0  # consecutive skipped steps
        self.skipped_total = 0

    # ---- one step ----

    def _set_lr(self, step: int) -> float:
        t = self.config.train
        lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        return lr

    def train_step(self, step: int) -> StepStats:
        """Forward/backward over grad_accum micro-batches, clip, and step unless anything is non-finite."""
        t = self.config.train
        self.model.train()
        lr = self._set_lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = aux_sum = 0.0
        for micro in range(t.grad_accum):
            idx_BT, targets_BT = self.data.train_batch(step * t.grad_accum + micro)
            with autocast_context(t.precision):
                out = self.model(idx_BT, targets_BT)
            (out.objective / t.grad_accum).backward()
            loss_sum += out.loss.item()
            aux_sum += out.aux_loss.item()
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        finite = math.isfinite(loss_sum) and math.isfinite(aux_sum) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            # Never let NaN/inf reach the weights: drop this step's gradients instead.
            self.optimizer.zero_grad(set_to_none=True)
        controllers.step(self.model, update=finite)  # ReMoE lambda, loss-free bias; a skipped step moves neither
        return StepStats(loss=loss_sum / t.grad_accum, aux_loss=aux_sum / t.grad_accum, grad_norm=grad_norm,
                         lr=lr, skipped=not finite, layers=routing_summary(out.routing, out.k_L))

    def _guard(self, stats: StepStats, step: int) -> None:
        if not stats.skipped:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.skipped_total += 1
        self.report(f"step {step}: non-finite loss={stats.loss} aux={stats.aux_loss} grad_norm={stats.grad_norm}; "
                    f"step skipped, weights unchanged ({self.bad_steps} in a row)")
        if self.bad_steps > self.config.train.max_bad_steps:
            raise RuntimeError(f"aborting at step {step}: {self.bad_steps} consecutive non-finite steps "
                               f"(train.max_bad_steps={self.config.train.max_bad_steps})")

    # ---- checkpoints ----

    def save(self) -> Path:
        """Checkpoint the state after `self.step` completed steps."""
        train_state = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng_torch": torch.get_rng_state(),
            "data_position": self.data.train.state_dict(next_step=self.step * self.config.train.grad_accum),
            "skipped_total": self.skipped_total,
        }
        meta = {"step": self.step, "config": self.config.to_dict()}
        self.saved_step = self.step
        return save_checkpoint(self.run_dir / "checkpoints", self.step, self.model.state_dict(), train_state, meta,
                               extra_files=self.data.checkpoint_files(), keep_last=self.config.train.keep_last)

    def _latest(self) -> Path:
        return self.run_dir / "checkpoints" / f"step_{self.step:07d}"

    def restore(self) -> Path | None:
        """Load the newest good checkpoint of this run (rejected ones are reported); None if there is none."""
        path = latest_good_checkpoint(self.run_dir / "checkpoints", self.report)
        if path is None:
            return None
        model_state, train_state, meta = load_checkpoint(path)
        if not same_config(meta["config"], self.config, sections=("model",)):
            raise ValueError(f"{path}: the checkpoint's model config differs from the requested one; "
                             f"use another train.name or the same model settings")
        self._warn_changed_settings(meta["config"], path)
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(train_state["optimizer"])
        torch.set_rng_state(train_state["rng_torch"])
        self.step = self.saved_step = train_state["step"]
        self.skipped_total = train_state["skipped_total"]
        # The loader checks the saved position was taken on the same data with the same windows.
        next_batch = self.data.train.load_state_dict(train_state["data_position"])
        if next_batch != self.step * self.config.train.grad_accum:
            raise ValueError(f"{path}: data position {next_batch} does not match step {self.step} x grad_accum "
                             f"{self.config.train.grad_accum}; resume with the same train.grad_accum")
        return path

    def _warn_changed_settings(self, saved: dict, path: Path) -> None:
        """Report settings that differ from the checkpoint's run (the result is then not an exact resume)."""
        now = self.config.to_dict()
        cosmetic = {"progress", "tensorboard", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_last",
                    "out_dir", "threads", "data_dir"}
        changed = [f"{section}.{key}" for section in ("data", "train") for key in now[section]
                   if key not in cosmetic and saved[section].get(key) != now[section][key]]
        if changed:
            self.report(f"warning: resuming {path} with changed settings {changed}; not an exact continuation")

    # ---- the loop ----

    def _start(self, resume: bool, metrics_reset: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        if resume:
            path = self.restore()
            if path is None:
                self.report(f"--resume: no checkpoint under {self.run_dir / 'checkpoints'}; starting at step 0")
            else:
                self.report(f"resumed from {path} at step {self.step}")
            MetricsWriter.truncate_after(self.run_dir, self.step)
        elif metrics_reset and (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()

    def fit(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to `train.steps` (or stop after step `stop_after`), evaluating and checkpointing on the way.

        Args:
            resume: continue from the newest good checkpoint of this run directory.
            stop_after: end the session once this many steps are done (checkpointed), as if interrupted.
        """
        t = self.config.train
        self._start(resume, metrics_reset=not resume)
        end = t.steps if stop_after is None else min(stop_after, t.steps)
        writer = MetricsWriter(self.run_dir, tensorboard=t.tensorboard)
        try:
            train_loss, tok_per_sec = self._run(writer, end)
            val_loss, val_layers = self._validate(writer)
            ckpt = self.save() if self.saved_step != self.step else self._latest()
        finally:
            writer.close()
        result = TrainResult(run_dir=str(self.run_dir), step=self.step, train_loss=train_loss, val_loss=val_loss,
                             tokens_per_sec=tok_per_sec, mean_active_experts=mean_active_experts(val_layers),
                             skipped_steps=self.skipped_total, checkpoint=str(ckpt),
                             num_params=self.model.num_params())
        atomic_write_text(self.run_dir / "summary.json", json.dumps(result.__dict__, indent=2) + "\n")
        return result

    def _run(self, writer: MetricsWriter, end: int) -> tuple[float | None, float | None]:
        """Steps self.step..end-1 with logging, periodic eval and checkpoints; returns last loss and tok/s."""
        t = self.config.train
        tokens_per_step = self.data.tokens_per_batch * t.grad_accum
        bar = _progress(t.progress, total=t.steps, initial=self.step)
        window_loss, window_steps, window_n, window_time = 0.0, 0, 0, 0.0
        train_time, train_steps = 0.0, 0
        last_loss = None
        while self.step < end:
            tic = time.perf_counter()
            stats = self.train_step(self.step)
            elapsed = time.perf_counter() - tic
            self._guard(stats, self.step)
            self.step += 1
            train_time, train_steps = train_time + elapsed, train_steps + 1
            window_time, window_n = window_time + elapsed, window_n + 1
            if not stats.skipped:
                window_loss, window_steps, last_loss = window_loss + stats.loss, window_steps + 1, stats.loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(stats, tokens_per_step / elapsed), refresh=False)
            if self.step % t.log_every == 0 or self.step == end:
                mean_loss = window_loss / window_steps if window_steps else None  # None: all skipped
                writer.write(_train_record(self.step, stats, mean_loss,
                                           tokens_per_step * window_n / max(window_time, 1e-9)))
                window_loss, window_steps, window_n, window_time = 0.0, 0, 0, 0.0
            if t.eval_every and self.step % t.eval_every == 0 and self.step < end:  # fit evaluates at end
                self._validate(writer)
            if t.ckpt_every and self.step % t.ckpt_every == 0:
                self.save()
        if bar is not None:
            bar.close()
        tok_per_sec = tokens_per_step * train_steps / train_time if train_steps else None
        return last_loss, tok_per_sec

    def _validate(self, writer: MetricsWriter) -> tuple[float, list[dict]]:
        t = self.config.train
        val_loss, layers = evaluate(self.model, self.data.val_batches(t.eval_batches), t.precision)
        writer.write({"step": self.step, "split": "val", "loss": val_loss,
                      "active_experts_mean": mean_active_experts(layers), "layers": layers})
        self.report(f"step {self.step}: val loss {val_loss:.4f}")
        return val_loss, layers


def _train_record(step: int, stats: StepStats, mean_loss: float | None, tok_per_sec: float) -> dict:
    return {"step": step, "split": "train", "loss": mean_loss, "aux_loss": stats.aux_loss, "lr": stats.lr,
            "grad_norm": stats.grad_norm, "tokens_per_sec": tok_per_sec,
            "active_experts_mean": mean_active_experts(stats.layers), "layers": stats.layers}


def _postfix(stats: StepStats, tok_per_sec: float) -> dict:
    post = {"loss": f"{stats.loss:.3f}", "tok/s": f"{tok_per_sec:.0f}"}
    active = mean_active_experts(stats.layers)
    if active is not None:
        post["active"] = f"{active:.2f}"
    return post


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _tqdm_write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)  # prints above an active progress bar instead of through it

