"""The main job end to end on the tiny preset: both variants train, evaluate and land in the report.

Run: .venv/bin/python -m pytest -q tests/e2e/test_main_job.py
"""

from __future__ import annotations

import json
import re

from softmoe.cli import main


def test_main_job_writes_report_with_plots_and_measured_numbers(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["main", "--preset", "tiny", "--out", str(out), "--data-dir", str(tmp_path / "data"),
                 "train.progress=false", "train.tensorboard=false", "train.steps=12", "train.eval_every=0"])
    assert code == 0
    report = out / "report.md"
    assert f"report written: {report}" in capsys.readouterr().out
    text = report.read_text()
    for png in ("loss.png", "layer_k_0.png", "active_experts.png"):
        assert (out / png).stat().st_size > 1000
        assert f"({png})" in text
    # the table's throughput is the run's measured number, not typed in
    for name, label in (("tiny-softmoe", "SoftMoE (soft mass K=2 of 8, learned k_l)"), ("tiny-topk", "top-k (k=2 of 8)")):
        summary = json.loads((out / name / "summary.json").read_text())
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"{summary['tokens_per_sec']:,.0f}" in row
        assert re.search(r"\| \d+\.\d{4} \|", row)  # final validation loss


def test_main_job_reuses_finished_runs(tmp_path, capsys):
    args = ["main", "--preset", "tiny", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
            "--variants", "topk", "train.progress=false", "train.tensorboard=false", "train.steps=4",
            "train.eval_every=0", "train.ckpt_every=0"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "already trained to step 4; reusing it" in capsys.readouterr().out


def test_main_job_without_matplotlib_writes_the_report_and_says_how_to_get_plots(tmp_path, capsys, monkeypatch):
    """A core-only install (no `viz` extra): the report without plots, exit 0 (issue 27: exit 1, no report)."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it raises ImportError, as if not installed
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    out = tmp_path / "out"
    code = main(["main", "--preset", "tiny", "--out", str(out), "--data-dir", str(tmp_path / "data"),
                 "--variants", "topk", "train.progress=false", "train.tensorboard=false", "train.steps=3",
                 "train.eval_every=0", "train.ckpt_every=0"])
    assert code == 0
    assert "without plots" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "pip install 'softmoe[viz]'" in text and "![" not in text
    assert not list(out.glob("*.png"))
    # the report names the command that reproduces it, and a tiny job's wall time in seconds, not "0.0 min"
    assert "Command: `softmoe main --preset tiny --out " in text and "--variants topk" in text
    assert re.search(r"Wall time of the whole job: \d+ s\.", text), text


def test_the_report_describes_each_variants_ffn():
    """A dense variant has no experts: the report's model line says what each variant's FFN is."""
    from pathlib import Path

    from softmoe.studies.main_job import _ffns, _variant_config

    configs = [_variant_config("tiny", name, Path("runs"), None, ()) for name in ("dense", "softmoe", "topk")]
    d_ff, experts = configs[0].model.d_ff, configs[1].model
    assert _ffns(configs) == f"a dense FFN of width {d_ff} / {experts.num_experts} experts of width {experts.d_expert}"
