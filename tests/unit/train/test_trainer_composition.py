"""The Trainer by composition: a `parallelize` function wraps the model once, before the optimizer is built, and a
`reduce` function makes the step's logged values global (softmoe/parallel/trainer.py passes the DDP / FSDP2 /
expert-parallel ones; the multi-process runs themselves are tests/e2e/test_distributed.py)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from softmoe.train.config import load_run_config
from softmoe.train.loop import Parallelized, Trainer, one_process

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny" / "softmoe.yaml"


def _config(tmp_path: Path):
    return load_run_config(TINY, [f"train.out_dir={tmp_path}", f"data.data_dir={tmp_path / 'data'}",
                                  "train.progress=false", "train.tensorboard=false", "train.grad_accum=2"])


def test_the_optimizer_is_built_once_after_parallelize(tmp_path):
    """A parallelize that replaces a parameter (as FSDP2's sharding does): the optimizer steps the new one."""
    calls = []

    def parallelize(model):
        calls.append(model)
        first = next(model.parameters())
        replacement = torch.nn.Parameter(first.detach().clone())
        owner_name, _, leaf = next(name for name, p in model.named_parameters() if p is first).rpartition(".")
        setattr(model.get_submodule(owner_name), leaf, replacement)
        return one_process(model)

    trainer = Trainer(_config(tmp_path), report=lambda _m: None, parallelize=parallelize)
    assert calls == [trainer.model]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters()}
    assert trainer.num_params() == trainer.model.num_params()


def test_forward_clip_and_reduce_are_the_composed_functions(tmp_path):
    config = _config(tmp_path)
    seen = {"forward": [], "clip": [], "reduce": []}

    def parallelize(model):
        inner = one_process(model)

        def forward(idx_BT, targets_BT, last_micro):
            seen["forward"].append(last_micro)
            return inner.forward(idx_BT, targets_BT, last_micro)

        def clip(max_norm):
            seen["clip"].append(max_norm)
            return inner.clip_grad_norm(max_norm)

        return Parallelized(forward=forward, clip_grad_norm=clip, num_params=123)

    def reduce(values, layers):
        seen["reduce"].append(list(values))
        return [2.0 * v for v in values], layers

    trainer = Trainer(config, report=lambda _m: None, parallelize=parallelize, reduce=reduce)
    stats = trainer.train_step(0)
    assert seen["forward"] == [False, True]  # the last micro-batch of the step is flagged
    assert seen["clip"] == [config.train.grad_clip if config.train.grad_clip > 0 else math.inf]
    (loss_sum, aux_sum), = seen["reduce"]
    assert stats.loss == 2.0 * loss_sum / 2 and stats.aux_loss == 2.0 * aux_sum / 2
    assert trainer.num_params() == 123


def test_a_skipped_step_names_what_was_not_finite():
    """A finite loss with a NaN gradient norm is reported as the gradient's fault, not the loss's."""
    from softmoe.train.loop import _non_finite

    assert _non_finite(loss=5.951234, aux_loss=0.0125, grad_norm=math.nan) == \
        "non-finite grad_norm=nan (loss=5.951, aux_loss=0.0125)"
    assert _non_finite(loss=math.inf, aux_loss=math.nan) == "non-finite loss=inf, aux_loss=nan"
