"""benchmarks/dial_diagnosis.py runs on a trained SoftMoE checkpoint: per K' the realized count, the kept weight
and where the paper's threshold fell, from the router logits its hooks capture; bad input is exit 2.

Run: .venv/bin/python -m pytest -q tests/unit/test_dial_diagnosis.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from softmoe.cli import main as softmoe_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.slow
def test_dial_diagnosis_on_a_tiny_trained_run(tmp_path, capsys):
    from benchmarks.dial_diagnosis import main

    assert softmoe_main(["train", "--config", str(CONFIGS / "tiny" / "softmoe.yaml"), f"train.out_dir={tmp_path}",
                         f"data.data_dir={tmp_path / 'data'}", "train.steps=3", "train.progress=false",
                         "train.tensorboard=false", "train.eval_every=0"]) == 0
    run_dir = tmp_path / "tiny-softmoe"
    out = tmp_path / "diag.json"
    assert main([str(run_dir), "--budgets", "1", "2", "3", "--batches", "1", "--thresholds", "0", "1.8", "16",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    points = result["points"]
    assert [p["budget"] for p in points] == [1.0, 2.0, 3.0]
    for point in points:
        means = point["mean_over_layers"]
        assert sum(point["k_L"]) / len(point["k_L"]) == pytest.approx(point["budget"], abs=1e-3)
        assert 1.0 <= means["active"] <= 16
        assert 0 < means["kept_weight"] <= point["budget"] + 1e-5
        for share in ("top1_at_least_half", "tau_upper_clamp", "tau_lower_clamp"):
            assert 0.0 <= means[share] <= 1.0
        assert len(point["per_layer"]) == len(point["k_L"])
    kept = [p["mean_over_layers"]["kept_weight"] for p in points]
    assert kept[0] < kept[1] < kept[2]  # raw p sums to k: the kept mass grows with K'
    assert "| K' | active experts |" in capsys.readouterr().out
    sweep = {p["threshold"]: p for p in result["threshold_sweep"]}
    assert result["threshold"] == pytest.approx(1.8) and list(sweep) == [0.0, 1.8, 16.0]
    assert sweep[16.0]["active"] == 1.0  # no expert passes: each token keeps its top one
    trained_k_L = next(p["k_L"] for p in points if p["budget"] == 2.0)  # the tiny preset's K
    caps = [min(math.ceil(2 * k), 8) for k in trained_k_L]  # m = ceil(k_l c), c = 2, E = 8
    assert sweep[0.0]["per_layer"] == pytest.approx(caps)  # every expert passes: each token keeps its cap
    assert sweep[0.0]["active"] >= sweep[1.8]["active"] >= 1.0 and len(sweep[1.8]["per_layer"]) == 2
    assert main([str(run_dir), "--budgets", "99"]) == 2  # out of the budget's bounds
    assert "budget=99.0 is out of range" in capsys.readouterr().err


def test_dial_diagnosis_refuses_bad_input(tmp_path, capsys):
    from benchmarks.dial_diagnosis import main

    assert main([str(tmp_path), "--batches", "0"]) == 2
    assert "--batches=0" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path), "--thresholds", "-1"]) == 2
    assert "--thresholds -1.0 must be a finite number >= 0" in capsys.readouterr().err
