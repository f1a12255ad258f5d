"""The realized-count budget (`model.budget_options.realized`): each layer's realized Train AE follows its k_l,
the mean follows K, and the budget dial then moves compute. The issue's acceptance run, on the tiny preset.

Run: .venv/bin/python -m pytest -q tests/e2e/test_realized_budget.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softmoe.cli import main
from softmoe.eval.budget import calibrate_thresholds, calibration_batches, dialed
from softmoe.train.controllers import realized_budget
from softmoe.train.loop import Trainer
from softmoe.train.metrics import DIAGNOSTIC_KEYS, read_metrics
from tests.e2e.test_smoke import quiet, tiny


@pytest.fixture(scope="module")
def realized_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("realized")
    config = tiny(root / "runs", root / "data", "model.budget_options.realized=true", "train.steps=200",
                  "train.name=realized")
    Trainer(config, report=quiet).fit()
    return root


def test_each_layer_follows_its_k_l_and_the_mean_follows_k(realized_run):
    summary = json.loads((realized_run / "runs" / "realized" / "summary.json").read_text())
    k_L, train_L = summary["k_per_layer"], summary["train_ae_per_layer"]
    assert len(k_L) == len(train_L) == 2
    assert max(abs(a - k) for a, k in zip(train_L, k_L)) <= 0.1, (train_L, k_L)
    assert abs(summary["train_ae"] - 2.0) <= 0.05
    assert abs(sum(k_L) / len(k_L) - 2.0) < 1e-5  # exact mode: the k_l still average to K


def test_the_paper_rule_does_not_follow_k(tmp_path):
    """The same preset without the option: K = 2 realizes far fewer experts (the problem the option solves)."""
    config = tiny(tmp_path / "runs", tmp_path / "data", "train.steps=40", "train.name=paper")
    result = Trainer(config, report=quiet).fit()
    assert result.train_ae < 1.6


def test_the_dial_moves_the_realized_count(realized_run, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(realized_run / "runs" / "realized"), "--budget", "1.0,3.0",
                 "--out", str(out), "--data-dir", str(realized_run / "data")]) == 0
    points = json.loads((out / "eval.json").read_text())["budget_dial"]["points"]
    low, high = (p["active_experts_mean"] for p in points)
    assert high - low >= 1.0, (low, high)
    assert low == pytest.approx(1.0, abs=0.1) and high == pytest.approx(3.0, abs=0.3)


def test_calibration_sets_each_layer_to_its_k_l_and_dialed_restores_the_thresholds(realized_run):
    from softmoe.eval.budget import check_budgets  # noqa: F401  (the dial's own checks run inside dialed)
    from softmoe.train.restore import load_model

    model, config, _ = load_model(realized_run / "runs" / "realized", quiet)
    _, routers = realized_budget(model)
    before = [r.threshold.clone() for r in routers]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (8 * 32 * 4 + 1,), generator=gen).numpy()
    batches = calibration_batches(tokens, 32, 8)
    with dialed(model, 1.5, batches) as k_L:
        counts = calibrate_thresholds(model, batches)
        assert torch.allclose(counts.float(), k_L.cpu(), atol=0.1), (counts, k_L)
    assert all(torch.equal(r.threshold, b) for r, b in zip(routers, before))
    with pytest.raises(ValueError, match="needs calibration batches"):
        with dialed(model, 1.5):
            pass


def test_metrics_carry_every_diagnostic_per_layer(realized_run):
    records = read_metrics(realized_run / "runs" / "realized")
    for split in ("train", "val"):
        rows = [r for r in records if r["split"] == split]
        assert rows
        for record in rows:
            for layer in record["layers"]:
                for key in DIAGNOSTIC_KEYS:
                    assert key in layer, (split, key)
                assert len(layer["expert_load"]) == 8 and abs(sum(layer["expert_load"]) - 1) < 1e-5
                assert 0.0 <= layer["dead_fraction"] <= 1.0 and layer["load_max_over_mean"] >= 1.0
                assert layer["logit_spread"] > 0 and layer["weight_sum_mean"] > 0
    summary = json.loads((realized_run / "runs" / "realized" / "summary.json").read_text())
    for key in ("k_per_layer", "logit_spread_per_layer", "weight_sum_per_layer", "dead_fraction_per_layer",
                "load_max_over_mean_per_layer", "load_cv_per_layer"):
        assert len(summary[key]) == 2, key
