"""Optimizer parameter groups (what gets weight decay) and the warmup + cosine schedule.

Run: .venv/bin/python -m pytest -q tests/unit/train/test_optim_schedule.py
"""

from __future__ import annotations

import math

import pytest
import torch

from softmoe.model import GPT, ModelConfig
from softmoe.train.optim import build_optimizer, param_groups
from softmoe.train.schedule import lr_at


def test_schedule_warmup_peak_and_floor():
    lrs = [lr_at(s, 1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[109] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lr_at(0, 1.0, warmup_steps=0, total_steps=1, min_lr_ratio=0.0) == 1.0
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, 1.0, 1, 2, 0.1)


def test_param_groups_decay_only_matrices():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, num_experts=4, d_expert=8, k=2.0,
                            max_seq_len=8))
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1, budget_lr_mult=3.0)}
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = {key: {by_id[id(p)] for p in g["params"]} for key, g in groups.items()}
    assert "embed.weight" in names["no_decay"]
    assert "budget.theta" in names["allocation"] and groups["allocation"]["lr_mult"] == 3.0
    assert groups["allocation"]["weight_decay"] == 0.0
    assert all("norm" not in n for n in names["decay"])
    assert "blocks.0.attn.qkv.weight" in names["decay"] and groups["decay"]["weight_decay"] == 0.1
    assert sum(len(v) for v in names.values()) == len(list(model.parameters()))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert math.isclose(opt.param_groups[0]["lr"], 1e-3)
