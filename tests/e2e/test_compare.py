"""`softmoe compare --study configs/studies/tiny.yaml` end to end: 2 variants x 2 seeds train, evaluate and
land in results.json / results.md with plots; a second invocation reuses every run and evaluation.

Run: .venv/bin/python -m pytest -q tests/e2e/test_compare.py
"""

from __future__ import annotations

import json
from pathlib import Path

from softmoe.cli import main

STUDY = Path(__file__).resolve().parents[2] / "configs" / "studies" / "tiny.yaml"


def test_compare_tiny_study_end_to_end_and_resumable(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["compare", "--study", str(STUDY), "--out", str(out), f"data.data_dir={tmp_path / 'data'}"]
    assert main([*args, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.count(" new") == 4 and "tokens: 2,048 per run, 8,192 in total" in plan
    assert not out.exists()  # a dry run trains nothing

    assert main(args) == 0
    assert f"results written: {out / 'results.md'}" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [("softmoe", 0), ("topk", 0), ("softmoe", 1),
                                                                   ("topk", 1)]
    rows = {row["variant"]: row for row in results["variants"]}
    assert rows["softmoe"]["seeds"] == rows["topk"]["seeds"] == 2
    assert rows["topk"]["active_experts_mean"]["mean"] == 2.0 and rows["topk"]["active_experts_mean"]["std"] == 0.0
    losses = [r["loss"] for r in results["runs"] if r["variant"] == "softmoe"]
    assert rows["softmoe"]["loss"]["mean"] == sum(losses) / 2 and losses[0] != losses[1]  # seeds differ
    assert all(len(r["k_L"]) == 2 for r in results["runs"] if r["variant"] == "softmoe")
    md = (out / "results.md").read_text()
    assert "| SoftMoE K=2 of 8 | 2 | " in md and " ± " in md
    for png in ("frontier.png", "allocation.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 1000 and f"({png})" in md

    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("finished (reused)") == 4
    assert main(args) == 0
    second = capsys.readouterr().out
    assert second.count("already trained to step 8; reusing it") == 4
    assert second.count("evaluation cached") == 4
