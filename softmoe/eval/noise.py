"""Realized active experts in training mode with the gate noise on and off: why Train AE and Infer AE differ.

Train AE is counted in training mode, where the routers add `gate_noise` to their logits; Infer AE in eval mode,
without it. On a trained checkpoint this measures, on the same batches and with no weight change, the training-mode
count with the noise as configured and with it switched off; the difference is the noise's share of the gap.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from softmoe.common.precision import module_device
from softmoe.eval.budget import active_per_layer
from softmoe.model import GPT
from softmoe.routing.base import GateRouter

__all__ = ["noise_off", "train_mode_active"]


@contextlib.contextmanager
def noise_off(model: GPT) -> Iterator[None]:
    """Every router of `model` with gate_noise 0 inside the block (its config restored on exit)."""
    routers = [m for m in model.modules() if isinstance(m, GateRouter)]
    saved = [r.config for r in routers]
    try:
        for r in routers:
            r.config = dataclasses.replace(r.config, gate_noise=0.0)
        yield
    finally:
        for r, config in zip(routers, saved):
            r.config = config


@torch.no_grad()
def train_mode_active(model: GPT, batches, precision: str = "fp32", noise: bool = True,
                      seed: int = 0) -> list[float]:
    """Per MoE layer, the realized mean active experts per token over `batches` in TRAINING mode (no gradient,
    no optimizer step; the noise drawn from a generator seeded with `seed`), with the gate noise as configured
    (`noise`) or switched off. The model's mode and the global RNG state are restored."""
    was_training = model.training
    device = module_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        try:
            with noise_off(model) if not noise else contextlib.nullcontext():
                active_L = active_per_layer(model, batches, precision)
        finally:
            model.train(was_training)
    return active_L.tolist()
