"""Shared fixtures of the eval tests: a tiny SoftMoE and a tiny top-k run, trained for a few steps.

Run: .venv/bin/python -m pytest -q tests/unit/eval
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softmoe.train.config import load_run_config
from softmoe.train.loop import Trainer

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def train_tiny(out_dir: Path, data_dir: Path, variant: str, *overrides: str) -> Path:
    """A tiny run of 6 steps with one final checkpoint; returns its run directory."""
    config = load_run_config(CONFIGS / "tiny" / f"{variant}.yaml", [
        f"train.out_dir={out_dir}", f"data.data_dir={data_dir}", "train.progress=false", "train.tensorboard=false",
        "train.steps=6", "train.eval_every=0", "train.ckpt_every=0", "train.eval_batches=1", *overrides])
    threads = torch.get_num_threads()
    try:
        Trainer(config, report=lambda message: None).fit()
    finally:
        torch.set_num_threads(threads)  # the preset sets the process-wide thread count
    return config.train.run_dir


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-data")


@pytest.fixture(scope="session")
def softmoe_run(tmp_path_factory, tiny_data) -> Path:
    return train_tiny(tmp_path_factory.mktemp("eval-runs"), tiny_data, "softmoe")


@pytest.fixture(scope="session")
def topk_run(tmp_path_factory, tiny_data) -> Path:
    return train_tiny(tmp_path_factory.mktemp("eval-runs"), tiny_data, "topk")
