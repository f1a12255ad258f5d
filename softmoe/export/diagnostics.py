"""Routing diagnostics in a transformers Trainer: a TrainerCallback that logs every MoE layer's routing.

    from softmoe.export.diagnostics import add_routing_diagnostics
    trainer = Trainer(model=model, args=args, train_dataset=data)   # model: SoftMoEForCausalLM
    add_routing_diagnostics(trainer)                                # first in line: every logger sees the keys
    trainer.train()

The callback observes the model's outputs (a forward hook reading `SoftMoECausalLMOutput.routing_stats`, the
return value; nothing is stored on the model) in training mode over each logging interval, and adds per layer,
under `softmoe/block{b}/<key>`: the nominal k (k_l, soft mass), the realized active experts per token, the
router logit spread and the summed combine weight (means over the interval's forwards), and the interval's
expert load as max/mean, coefficient of variation and dead-expert fraction (routing/diagnostics.py). The keys
go into the `logs` of `on_log` (so callbacks after it, TensorBoard or W&B, log them) and into the Trainer's
`state.log_history` (trainer_state.json).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import TrainerCallback

from softmoe.routing.diagnostics import RoutingCounts

__all__ = ["RoutingDiagnosticsCallback", "add_routing_diagnostics", "MEAN_KEYS"]

# Per-forward 0-d statistics averaged over the logging interval.
MEAN_KEYS = ("k", "active_experts_mean", "logit_spread", "weight_sum_mean")


class RoutingDiagnosticsCallback(TrainerCallback):
    """Logs per-layer routing diagnostics of a SoftMoE model (module docstring)."""

    def __init__(self, prefix: str = "softmoe"):
        self.prefix = prefix
        self.window = RoutingCounts()
        self.sums: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        self.forwards = 0
        self._handle = None

    def observe(self, routing_stats: dict) -> None:
        """Add one training forward's per-layer stats (block -> LayerStats, name -> tensor) to the interval."""
        self.window.add(routing_stats)
        for block, stats in routing_stats.items():
            for key in MEAN_KEYS:
                if key in stats:
                    value = stats[key].detach().double()
                    self.sums[block][key] = self.sums[block][key] + value if key in self.sums[block] else value
        self.forwards += 1

    def _hook(self, module, args, output) -> None:
        stats = getattr(output, "routing_stats", None)
        if module.training and stats:
            self.observe(stats)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._handle is None and model is not None:
            self._handle = model.register_forward_hook(self._hook)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def summary(self) -> dict[str, float]:
        """The interval's diagnostics as flat `prefix/block{b}/key` floats (one host sync), then a new interval."""
        out: dict[str, float] = {}
        if self.forwards:
            loads = self.window.summary()
            for block in sorted(self.sums):
                values = {key: total / self.forwards for key, total in self.sums[block].items()}
                values.update({key: v for key, v in loads.get(block, {}).items() if key != "expert_load"})
                for key, value in values.items():
                    out[f"{self.prefix}/block{block}/{key}"] = float(value)
        self.window.reset()
        self.sums = defaultdict(dict)
        self.forwards = 0
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.forwards or "loss" not in logs:  # training logs only (not eval's)
            return
        diagnostics = self.summary()
        logs.update(diagnostics)
        if state.log_history:
            state.log_history[-1].update(diagnostics)


def add_routing_diagnostics(trainer, prefix: str = "softmoe") -> RoutingDiagnosticsCallback:
    """Put a RoutingDiagnosticsCallback first among `trainer`'s callbacks (so the loggers after it see its keys)."""
    callback = RoutingDiagnosticsCallback(prefix)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
