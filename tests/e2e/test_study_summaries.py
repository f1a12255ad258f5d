"""A study across sittings: committed run summaries, `--next N`, mixed-config refusal, `--force`, the study
report (claims table, plots) and two runs side by side (`--jobs 2`), on a tiny two-variant study.

Run: .venv/bin/python -m pytest -q tests/e2e/test_study_summaries.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from softmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write_study(tmp_path: Path) -> Path:
    study = {
        "name": "tinysum", "base": str(ROOT / "configs" / "tiny" / "softmoe.yaml"), "seeds": [0, 1],
        "overrides": {"train.steps": 6, "train.log_every": 2, "train.eval_every": 0, "train.ckpt_every": 0,
                      "train.progress": False, "train.tensorboard": False},
        "eval": {"splits": ["val"]}, "references": ["topk"], "claims": {"top2": "topk", "learned": "softmoe"},
        "paper": {"margin": 0.02, "best_margin": 0.0, "accuracy_margin": 0.01, "late_share": 0.5},
        "variants": [{"name": "softmoe", "label": "SoftMoE K=2", "overrides": {"model.k": 2.0}, "dial": [1.5, 3]},
                     {"name": "topk", "label": "top-k k=2", "overrides": {"model.router": "topk", "model.k": 2}}]}
    path = tmp_path / "tinysum.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_summaries_make_a_study_resumable_across_sittings(tmp_path, capsys):
    study, summaries = write_study(tmp_path), tmp_path / "docs" / "tinysum"
    args = ["compare", "--study", str(study), "--out", str(tmp_path / "runs"), "--summaries", str(summaries),
            "--quiet", f"data.data_dir={tmp_path / 'data'}"]
    assert main([*args, "--next", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 runs planned, 0 summarised, 4 missing; running 1 now" in out
    assert sorted(p.name for p in (summaries / "runs").iterdir()) == ["tinysum-softmoe-s0.json"]
    summary = json.loads((summaries / "runs" / "tinysum-softmoe-s0.json").read_text())
    assert summary["k_trajectory"]["step"] == [2, 4, 6] and len(summary["k_trajectory"]["k_L"][0]) == 2
    assert [p["budget"] for p in summary["dial"]] == [1.5, 3.0]
    assert summary["curves"]["val"]["step"] == [6] and summary["record"]["train_ae"] > 0
    assert (summaries / "runs" / "tinysum-softmoe-s0.json").stat().st_size < 20_000
    report = (summaries / "report.md").read_text()
    assert "1 of 4 planned runs summarised" in report and "| paper's claim | paper's number | ours | holds? |" in report
    assert "not yet measured (topk missing)" in report

    # another machine: the run dirs are gone, the committed summaries remain; the summarised run is not retrained
    shutil.rmtree(tmp_path / "runs")
    assert main([*args, "--next", "0"]) == 0
    assert "1 summarised, 3 missing; running 0 now" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "tinysum-softmoe-s0").exists()
    assert main([*args, "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 summarised, 3 missing; running 3 now, 2 at a time" in out
    assert not (tmp_path / "runs" / "tinysum-softmoe-s0").exists()
    assert len(list((summaries / "runs").iterdir())) == 4
    saved = json.loads((summaries / "runs" / "tinysum-topk-s1.json").read_text())
    assert saved["config"]["train"]["threads"] == 1  # side by side: one thread each
    assert "k_L" not in saved["k_trajectory"] and len(saved["k_trajectory"]["active_L"]) == 3  # top-k: no budget
    report = (summaries / "report.md").read_text()
    assert "4 of 4 planned runs summarised" in report and "| SoftMoE K=2 |" in report
    assert "(n=2)" in report and "## Budget dial" in report
    for png in ("frontier_ae.png", "depth.png", "k_trajectories.png", "dial.png"):
        assert (summaries / png).stat().st_size > 1000 and f"({png})" in report

    # a changed study does not mix with the committed summaries
    assert main([*args, "train.lr=0.005"]) == 2
    err = capsys.readouterr().err
    assert "tinysum-softmoe-s0.json was trained with other settings" in err and "train.lr" in err
    assert err.count("\n") == 1  # one line, no traceback
    # --force redoes runs in plan order (here: retrains the first, whose run dir is gone) and rewrites their
    # summaries; the others still count; the same config and batches give the same loss
    first = json.loads((summaries / "runs" / "tinysum-softmoe-s0.json").read_text())
    (summaries / "runs" / "tinysum-softmoe-s0.json").write_text("{}")
    assert main([*args, "--force", "--next", "1"]) == 0
    assert "4 runs planned, 3 summarised, 4 to redo (--force); running 1 now" in capsys.readouterr().out
    again = json.loads((summaries / "runs" / "tinysum-softmoe-s0.json").read_text())
    assert again["record"]["loss"] == first["record"]["loss"]
    assert "4 of 4 planned runs summarised" in (summaries / "report.md").read_text()
