"""`softmoe eval` end to end on tiny checkpoints: eval.json / eval.md with LM metrics, routing, FLOPs and
the budget dial; a stubbed zero-shot task wired through; CLI errors exit 2 without writing anything.

Run: .venv/bin/python -m pytest -q tests/e2e/test_eval_cli.py
"""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from softmoe.cli import main
from tests.unit.eval.conftest import train_tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root, data = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("data")
    return {"data": data, **{variant: train_tiny(root, data, variant) for variant in ("softmoe", "topk")}}


def test_eval_writes_metrics_routing_cost_and_budget_dial(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(runs["softmoe"]), "--tasks", "none", "--budget", "1.0,2.0,3.0",
                 "--out", str(out), "--data-dir", str(runs["data"])])
    assert code == 0
    assert f"wrote {out / 'eval.json'}" in capsys.readouterr().out
    payload = json.loads((out / "eval.json").read_text())
    entries = {(e["corpus"], e["split"]): e for e in payload["language_modelling"]}
    assert set(entries) == {("tiny", "val"), ("tiny", "test")}
    meta = json.loads((runs["data"] / "tiny" / "meta.json").read_text())
    for (_, split), e in entries.items():
        assert e["bytes"] == meta["splits"][split]["bytes"]
        assert e["tokens"] == meta["splits"][split]["tokens"] - 1  # every target but the first token's
        assert e["bits_per_byte"] == pytest.approx(e["loss"] * e["tokens"] / (e["bytes"] * math.log(2)))
        assert e["perplexity"] == pytest.approx(math.exp(e["loss"]))
        assert len(e["routing"]["layers"]) == 2 and sum(e["routing"]["layers"][0]["expert_load"]) == \
            pytest.approx(1.0, abs=1e-4)
        assert 0 < e["cost"]["active_params"] < e["cost"]["total_params"]
    dial = payload["budget_dial"]["points"]
    assert [p["budget"] for p in dial] == [1.0, 2.0, 3.0]
    assert all(sum(p["k_L"]) / 2 == pytest.approx(p["budget"], abs=1e-5) for p in dial)
    # The realized count is reported for each K' and stays within the paper rule's [1, ceil(2 K')]
    # (how it follows K' is tested on a sharper router in tests/unit/eval/test_budget_dial.py).
    assert all(1.0 <= p["active_experts_mean"] <= math.ceil(2 * p["budget"]) for p in dial)
    assert (out / "budget_dial.png").stat().st_size > 1000
    md = (out / "eval.md").read_text()
    assert "## Budget dial" in md and "(budget_dial.png)" in md and "## Routing" in md
    assert not list(out.glob("*.tmp*"))


def test_eval_defaults_to_the_run_dir_and_scores_a_top_k_model(runs, capsys):
    args = ["eval", "--checkpoint", str(runs["topk"]), "--splits", "val", "--data-dir", str(runs["data"])]
    assert main(args) == 0
    payload = json.loads((runs["topk"] / "eval" / "eval.json").read_text())
    e = payload["language_modelling"][0]
    assert e["routing"]["active_experts_mean"] == pytest.approx(2.0)  # top-2 routes exactly 2 experts
    assert payload["budget_dial"] is None and payload["tasks"] == {}


@pytest.mark.parametrize("args, message", [
    (["--budget", "1.0,2.0"], "router='topk'"),
    (["--budget", "9"], None),
    (["--splits", "dev"], "splits="),
    (["--corpora", "prose"], "cannot score corpus='prose'"),
])
def test_eval_errors_exit_2_and_write_nothing(runs, tmp_path, capsys, args, message):
    variant = "topk" if message == "router='topk'" else "softmoe"
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(runs[variant]), "--out", str(out), "--data-dir", str(runs["data"]),
                 *args])
    assert code == 2
    err = capsys.readouterr().err
    assert (message or "budget=9.0 is out of range") in err
    assert not out.exists()


@dataclass
class StubResult:
    acc: float
    acc_norm: float
    n: int


def test_eval_runs_zero_shot_tasks_through_evaluate_tasks(runs, tmp_path, monkeypatch, capsys):
    """A stub downstream module: the CLI must call evaluate_tasks per task and attach the task's routing."""
    calls = []

    def evaluate_tasks(model, tokenizer, tasks, limit=None, batch_size=16, precision="fp32", seed=0):
        import torch

        calls.append((list(tasks), limit, precision))
        ids = tokenizer.encode("Four score and seven years ago").ids
        model(torch.tensor([ids]))  # one forward, so the task's routing is recorded
        return {name: StubResult(acc=0.5, acc_norm=0.25, n=3) for name in tasks}

    stub = types.ModuleType("softmoe.eval.downstream")
    stub.TASKS = {"stub_a": None, "stub_b": None}
    stub.evaluate_tasks = evaluate_tasks
    monkeypatch.setitem(sys.modules, "softmoe.eval.downstream", stub)
    import softmoe.eval  # imported here too: the test must not depend on an earlier test having imported it

    monkeypatch.setattr(softmoe.eval, "downstream", stub, raising=False)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(runs["softmoe"]), "--splits", "val", "--tasks", "all", "--limit", "3",
                 "--precision", "fp32", "--out", str(out), "--data-dir", str(runs["data"])]) == 0
    assert calls == [(["stub_a"], 3, "fp32"), (["stub_b"], 3, "fp32")]
    printed = capsys.readouterr().out  # the scores on stdout too, not only in eval.md / eval.json
    assert "stub_a (zero-shot, 3 items): acc 0.500, acc_norm 0.250, Infer AE " in printed, printed
    tasks = json.loads((out / "eval.json").read_text())["tasks"]
    assert tasks["stub_a"]["acc"] == 0.5 and tasks["stub_a"]["n"] == 3
    assert 1.0 <= tasks["stub_a"]["active_experts_mean"] <= 4.0 and len(tasks["stub_b"]["active_experts"]) == 2
    assert "## Zero-shot tasks" in (out / "eval.md").read_text()
    code = main(["eval", "--checkpoint", str(runs["softmoe"]), "--tasks", "nope", "--out", str(tmp_path / "x"),
                 "--data-dir", str(runs["data"])])
    assert code == 2 and not (tmp_path / "x").exists()
