"""Metrics: routing stats become plain JSON, records append and truncate on resume.

Run: .venv/bin/python -m pytest -q tests/unit/train/test_metrics.py
"""

from __future__ import annotations

import json

import torch

from softmoe.train.metrics import MetricsWriter, mean_active_experts, read_metrics, routing_summary, train_ae


def test_routing_summary_is_json_friendly():
    routing = {1: {"k": torch.tensor(2.25), "active_experts_mean": torch.tensor(2.5),
                   "expert_load": torch.tensor([0.5, 0.5]), "expert_counts": torch.tensor([3.0, 3.0])},
               3: {"k": torch.tensor(1.75), "active_experts_mean": torch.tensor(1.5),
                   "expert_load": torch.tensor([1.0, 0.0]), "real_tokens": torch.tensor(4.0)}}
    layers = routing_summary(routing)  # k is each layer's own report; the raw counts stay out
    assert layers == [{"block": 1, "k": 2.25, "active_experts_mean": 2.5, "expert_load": [0.5, 0.5]},
                      {"block": 3, "k": 1.75, "active_experts_mean": 1.5, "expert_load": [1.0, 0.0]}]
    json.dumps(layers)
    assert mean_active_experts(layers) == 2.0
    assert mean_active_experts([]) is None


def test_write_read_and_truncate(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in (5, 10, 15):
        writer.write({"step": step, "split": "train", "loss": torch.tensor(1.0 / step)})
    writer.write({"step": 10, "split": "val", "loss": 0.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "spl')  # the torn last line of a killed run
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [5, 10, 15]
    MetricsWriter.truncate_after(tmp_path, 10)
    assert [(r["step"], r["split"]) for r in read_metrics(tmp_path)] == [(5, "train"), (10, "train"), (10, "val")]
    assert not list(tmp_path.glob("*.tmp"))


def test_train_ae_averages_the_records_of_the_last_fifth_of_the_steps():
    """625 steps logged every 25: the last 20% of the steps are 501-625, covered by the records of steps
    525-625 (the record of step 500 covers steps 476-500). Layer values 1x and 3x the step; val records ignored."""
    records = [{"step": s, "split": "train", "active_experts_mean": 2.0 * s,
                "layers": [{"active_experts_mean": 1.0 * s}, {"active_experts_mean": 3.0 * s}]}
               for s in range(25, 626, 25)]
    records.append({"step": 625, "split": "val", "active_experts_mean": -1.0, "layers": []})
    mean, per_layer = train_ae(records)
    assert mean == 2.0 * 575 and per_layer == [575.0, 3.0 * 575]  # mean of 525, 550, 575, 600, 625
    assert train_ae(records[:1]) == (50.0, [25.0, 75.0])  # one record: itself
    assert train_ae([{"step": 4, "split": "val", "active_experts_mean": 1.0}]) == (None, [])
