"""benchmarks/bench_train.py: preset variants and one worker measurement on the tiny preset (no timing asserted)."""

import json

import pytest

from benchmarks.bench_train import main, split_preset


def test_split_preset_reads_overrides():
    assert split_preset("demo/topk") == ("demo/topk", [])
    assert split_preset("demo/topk@model.k=1@train.lr=1e-3") == ("demo/topk", ["model.k=1", "train.lr=1e-3"])


@pytest.mark.parametrize("bad", ["@model.k=1", "demo/topk@model.k"])
def test_split_preset_rejects_malformed(bad):
    with pytest.raises(SystemExit, match="--presets"):
        split_preset(bad)


def test_worker_applies_the_variant(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--worker", "tiny/topk@model.k=1", "--steps", "1", "--warmup", "0", "--profile-steps", "0",
                 "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["active_experts_mean"] == pytest.approx(1.0)  # top-1, not the preset's k
    assert row["tok_s"] > 0 and row["model_flops_per_token"]["train"] > 0


def test_interleaved_rows_pair_steps(capsys):
    assert main(["--interleave", "--presets", "tiny/dense,tiny/topk@model.k=1", "--steps", "2", "--warmup", "0",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| tiny/dense |" in out and "| tiny/topk@model.k=1 |" in out
    assert "tok/s per step" in out
