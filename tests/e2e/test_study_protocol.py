"""A pre-registered study's run summaries carry what its protocol needs: the training commit, the routing
diagnostics, the gate-noise on/off count, the last Train AE, the realized-count budget's per-layer thresholds and
its dial; the results refuse summaries of another commit unless told.

Run: .venv/bin/python -m pytest -q tests/e2e/test_study_protocol.py
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from softmoe.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_a_pinned_study_records_its_protocol_and_refuses_mixed_commits(tmp_path, capsys):
    study = {
        "name": "proto", "base": str(CONFIGS / "tiny" / "softmoe.yaml"), "out_dir": str(tmp_path / "runs"),
        "summaries": str(tmp_path / "docs"), "seeds": [0], "references": ["topk-k2"],
        "overrides": {"train.steps": 6, "train.log_every": 2, "train.progress": False, "train.tensorboard": False,
                      "data.data_dir": str(tmp_path / "data"), "model.router_options.gate_noise": 0.5},
        "eval": {"splits": ["val"]},
        "preregistration": {"registered": "test", "margin": 0.02},
        "variants": [
            {"name": "topk-k2", "overrides": {"model.router": "topk", "model.k": 2}},
            {"name": "realized", "overrides": {"model.k": 1.5, "model.budget_options.realized": True}, "dial": [1, 3]},
            {"name": "norm", "overrides": {"model.k": 1.5, "model.router_options.combine": "raw_p_norm"},
             "exploratory": True},
        ],
    }
    path = tmp_path / "proto.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["compare", "--config", str(path), "--quiet"]) == 0
    report = (tmp_path / "docs" / "report.md").read_text()
    assert "## Routing diagnostics" in report and "[exploratory]" in report
    assert (tmp_path / "docs" / "logit_spread.png").is_file() and (tmp_path / "docs" / "expert_load.png").is_file()
    runs = tmp_path / "docs" / "runs"
    realized = json.loads((runs / "proto-realized-s0.json").read_text())
    commits = realized["revision"]["commits"]
    assert len(commits) <= 1 and len(realized["revision"]["sessions"]) == 1
    record = realized["record"]
    for key in ("train_ae_last", "train_mode_ae_noise_on", "train_mode_ae_noise_off"):
        assert isinstance(record[key], float), key
    assert len(realized["k_trajectory"]["threshold_L"][0]) == 2 and len(realized["k_trajectory"]["spread_L"][0]) == 2
    layer = realized["routing"]["layers"][0]
    assert {"expert_load", "logit_spread", "dead_fraction", "active_experts_hist"} <= set(layer)
    low, high = (p["active_experts_mean"] for p in realized["dial"])
    assert high - low > 1.0  # the realized-count budget's dial moves the count
    if not commits:
        return  # not a git checkout: nothing recorded, nothing to refuse
    topk = runs / "proto-topk-k2-s0.json"
    summary = json.loads(topk.read_text())
    summary["revision"]["commits"] = ["0" * 40]  # as if trained by another commit
    topk.write_text(json.dumps(summary))
    capsys.readouterr()
    assert main(["compare", "--config", str(path), "--next", "0", "--quiet"]) == 2
    assert "trained by 2 commits" in capsys.readouterr().err
    assert main(["compare", "--config", str(path), "--next", "0", "--quiet", "--mixed-revisions"]) == 0
