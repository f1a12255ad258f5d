"""The GPU check arrives working: benchmarks/bench_gpu.py runs every part in --quick mode on the CPU and writes
its JSON and markdown, and benchmarks/gpu_check.sh is valid bash that points at existing files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_gpu_quick_on_cpu(tmp_path):
    from benchmarks.bench_gpu import main

    assert main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["errors"] == {}
    assert {(r["tokens"], r["experts"]) for r in result["ops"]} == {(2048, 8), (2048, 64)}
    assert all(r["eager_over_hard"] > 0 and "fused" not in r["ms"] for r in result["ops"])  # no Triton on CPU
    (layer,) = result["layer"]
    assert layer["softmoe_over_topk"] > 0 and ("hf_over_topk" in layer or "hf_mixtral_skipped" in layer)
    assert [r["preset"] for r in result["train"]] == ["tiny/softmoe", "tiny/topk"]
    assert all(r["tok_s"] > 0 and 0 < r["mfu"] < 1 for r in result["train"])
    markdown = (tmp_path / "bench_gpu.md").read_text()
    assert "| 2048 | 64 |" in markdown and "tiny/topk" in markdown


def test_bench_gpu_rejects_bad_arguments(tmp_path):
    from benchmarks.bench_gpu import main

    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--out", str(tmp_path), "--parts", "ops,bogus"])
    with pytest.raises(ValueError, match="--device='tpu'"):
        main(["--device", "tpu", "--out", str(tmp_path)])


def test_gpu_check_script_is_valid_bash():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for path in ("tests/gpu", "tests/unit/ops/test_lapsum_triton.py", "benchmarks/bench_gpu.py",
                 "benchmarks/bench_infer.py"):
        assert path in text and (ROOT / path).exists(), path


@pytest.mark.parametrize("preset", ["small/softmoe", "small/topk", "small/dense"])
def test_full_mode_train_presets_build_a_trainer(preset):
    """The GPU run's own train part (full mode, not --quick): each preset's config on the fixture corpus is valid
    (it once asked for more validation windows than the fixture holds and failed only on the GPU)."""
    import torch

    from benchmarks.bench_gpu import FULL, train_config
    from softmoe.train.loop import Trainer

    assert preset in FULL["train"]["presets"]
    config = train_config(preset, FULL["train"], torch.device("cpu"), compile_model=False)
    Trainer(config, report=lambda message: None)
