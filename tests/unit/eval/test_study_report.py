"""The study report's statistics and claims table on hand-made records, and the paper8 study's plan.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_study_report.py
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from softmoe.studies.plan import load_study, plan_runs
from softmoe.studies.study_report import (PaperClaims, claims_rows, paired, study_report_markdown, t_interval,
                                          write_study_report)

STUDIES = Path(__file__).resolve().parents[3] / "configs" / "studies"
PAPER = load_study(STUDIES / "paper8.yaml").paper  # the paper's numbers and the verdict margins


def rec(variant: str, seed: int, loss: float, train_ae: float = 2.0, infer_ae: float = 2.0, k_L=None,
        acc: float | None = None, router: str = "softmoe") -> dict:
    tasks = {} if acc is None else {"piqa": {"n": 100, "acc": acc, "acc_norm": acc, "perplexity": None}}
    return {"variant": variant, "seed": seed, "loss": loss, "train_ae": train_ae, "active_experts_mean": infer_ae,
            "k_L": k_L, "train_ae_per_layer": [train_ae] * len(k_L or [0] * 4),
            "active_experts_per_layer": [infer_ae] * len(k_L or [0] * 4),
            "tasks": tasks, "task_ci": {"piqa": {"acc": [acc - 0.05, acc + 0.05], "acc_norm": [acc - 0.05, acc + 0.05]}}
            if acc is not None else {},
            "router": router, "k_trajectory": {"step": [1, 2], "k_L": [k_L, k_L], "active_L": [[1] * 4] * 2,
                                               "threshold": [1.8, 1.6]}  # as if held by the controller
            if k_L else {}, "dial": None}


def test_t_interval_and_paired_differences():
    stat = t_interval([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["n"] == 3
    assert stat["high"] - 2.0 == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    assert t_interval([5.0]) == {"mean": 5.0, "low": None, "high": None, "n": 1}
    assert t_interval([None]) == {"mean": None, "low": None, "high": None, "n": 0}
    records = [rec("a", 0, 3.0), rec("a", 1, 3.2), rec("b", 0, 3.1), rec("b", 1, 3.4), rec("b", 2, 9.0)]
    d = paired(records, "b", "a")
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.15) and d["lower"] == 0  # seed 2 has no partner


class _Claims:
    """claims_rows by the start of the claim's text."""

    def __init__(self, records):
        self.rows = claims_rows(records, {"top2": "top2", "learned": "soft"}, PAPER)

    def __getitem__(self, start: str):
        return next(row for row in self.rows if row[0].startswith(start))


_claims = _Claims


def test_claims_rows_follow_the_stated_rules():
    k_late = [1.2, 1.2, 1.2, 1.2, 1.2, 2.0, 2.0, 2.0]  # last 3 of 8 hold 6 / 12.0 = 0.5 > 3/8
    better = [rec("top2", s, 3.0 + 0.1 * s, router="topk", acc=0.60) for s in range(3)] + \
             [rec("soft", s, 2.95 + 0.1 * s + 0.001 * s, train_ae=1.6, infer_ae=1.9, k_L=k_late, acc=0.61)
              for s in range(3)]
    rows = _claims(better)
    assert rows["LM loss comparable "][3] == "yes (lower loss)"
    assert "Train AE 1.60" in rows["LM loss comparable "][2]
    assert rows["The learned allocatio"][3] == "soft: k_l yes; realized AE not resolved"  # realized: uniform
    assert rows["Infer AE exceeds Trai"][3] == "yes"
    assert rows["Downstream zero-shot"][3] == "yes"
    assert rows["SoftMoE* (fixed unifo"][3].startswith("not yet measured")
    worse = [dict(r, loss=r["loss"] + 0.2) if r["variant"] == "soft" else r for r in better]
    assert _claims(worse)["LM loss comparable "][3] == "no (higher loss)"
    more = [dict(r, active_experts_mean=2.5) if r["variant"] == "soft" else r for r in better]
    assert _claims(more)["LM loss comparable "][3] == "no (not fewer experts than top-2)"
    one = [r for r in better if r["seed"] == 0]
    assert _claims(one)["LM loss comparable "][3] == "not resolved (one seed)"
    early = [dict(r, k_L=k_late[::-1]) if r["variant"] == "soft" else r for r in better]
    assert _claims(early)["The learned allocatio"][3].startswith("soft: k_l no (earlier layers take more);")
    # the realized count can rise with depth while k_l falls (the paper8 study's models): judged apart
    def realized(per_layer):
        return [dict(r, train_ae_per_layer=[a + 0.01 * r["seed"] for a in per_layer]) if r["variant"] == "soft"
                else r for r in early]

    row = _claims(realized([1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 1.6, 1.7]))["The learned allocatio"]  # 4.8 / 9.8
    assert row[3] == "soft: k_l no (earlier layers take more); realized AE yes"
    assert "share of the realized Train AE 0.489" in row[2]
    # above uniform (3/8) but short of halfway to the paper's ~half ((3/8 + 1/2) / 2 = 0.4375): 3.6 / 8.6 = 0.419
    row = _claims(realized([1.0, 1.0, 1.0, 1.0, 1.0, 1.1, 1.2, 1.3]))["The learned allocatio"]
    assert row[3].endswith("realized AE direction only (later layers take more, less than the paper's ~half)")
    chance = [dict(r, task_ci={"piqa": {"acc": [0.45, 0.55], "acc_norm": [0.45, 0.55]}}) for r in better]
    assert _claims(chance)["Downstream zero-shot"][3].startswith("untestable here")
    short = [dict(r, task_ci={"piqa": {"acc": [0.51, 0.71], "acc_norm": [0.45, 0.64]}}) for r in better]
    assert _claims(short)["Downstream zero-shot"][3].startswith("untestable here")  # acc alone is not enough


def test_report_markdown_and_plots_from_fake_records(tmp_path):
    variants = (SimpleNamespace(name="top2", label="top-k k=2"), SimpleNamespace(name="soft", label="SoftMoE"))
    study = SimpleNamespace(name="fake", variants=variants, references=("top2",),
                            claims=(("top2", "top2"), ("learned", "soft")), paper=PAPER)
    records = [rec("top2", s, 3.0 + 0.1 * s, router="topk", acc=0.6) for s in range(2)] + \
              [dict(rec("soft", s, 2.9 + 0.1 * s, k_L=[1.0, 1.5, 2.0, 1.5], acc=0.62),
                    dial=[{"budget": b, "loss": 3.0 - 0.1 * b, "active_experts_mean": b} for b in (1.0, 2.0)])
               for s in range(2)]
    md = study_report_markdown(study, records, [], planned=5)
    assert "4 of 5 planned runs summarised" in md
    assert "| SoftMoE | 2.9500 [" in md and "| -0.1000 (n=2)" not in md
    assert "(reference)" in md and "## Budget dial" in md and "## Zero-shot tasks" in md
    assert "| SoftMoE | 2 | 1.00, 1.50, 2.00, 1.50 |" in md
    for r in records:  # the final evaluation's routing per layer: 4 experts; soft tokens use 1-3, top-2 uses 2
        hist = [0, 30, 50, 20, 0] if r["variant"] == "soft" else [0, 0, 100, 0, 0]
        r["routing"] = {"layers": [{"expert_load": [0.4, 0.3, 0.2, 0.1], "active_experts_hist": hist}] * 4}
    path = write_study_report(study, records, tmp_path, planned=5)
    text = path.read_text()
    for png in ("frontier_ae.png", "depth.png", "k_trajectories.png", "dial.png", "expert_load.png",
                "experts_per_token.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"({png})" in text


def _trajectory(early: list[float], late: list[float], end_move: float = 0.0) -> dict:
    """Logged at steps 10..100: k_l walks linearly from `early` to `late` by step 80, then (layer 0 only)
    `end_move` more by step 100."""
    steps = list(range(10, 101, 10))
    k = []
    for s in steps:
        w = min(s, 80) / 80
        row = [a + w * (b - a) for a, b in zip(early, late)]
        row[0] += end_move * max(s - 80, 0) / 20
        k.append(row)
    return {"step": steps, "k_L": k, "active_L": [[1.0] * len(early)] * len(steps)}


def test_allocation_movement_reads_the_trajectory_and_says_whether_k_settled():
    from softmoe.studies.study_report import SETTLE_TOL, allocation_movement

    uniform, late = [1.5] * 4, [1.0, 1.0, 1.0, 3.0]  # last ceil(1.2) = 2 of 4 layers: share 0.5 -> 4 / 6
    records = [dict(rec("soft", s, 3.0, k_L=late), k_trajectory=_trajectory(uniform, late)) for s in range(2)]
    m = allocation_movement(records, "soft")
    assert m["seeds"] == 2 and m["settled"] and m["last_move"] == pytest.approx([0.0] * 4)
    shares = [m["late_share"][f] for f in (0.25, 0.5, 0.75, 1.0)]
    assert 0.5 < shares[0] < shares[1] < shares[2] < shares[3] == pytest.approx(4 / 6)
    moving = [dict(r, k_trajectory=_trajectory(uniform, late, end_move=-2 * SETTLE_TOL)) for r in records]
    m = allocation_movement(moving, "soft")
    assert not m["settled"] and m["last_move"][0] == pytest.approx(-2 * SETTLE_TOL)
    fixed = [dict(r, k_trajectory=_trajectory(uniform, uniform)) for r in records]
    assert allocation_movement(fixed, "soft") is None  # a fixed k never moved
    assert allocation_movement([rec("top2", 0, 3.0, router="topk")], "top2") is None  # no trajectory
    # the claims table says when the allocation it judges was still moving
    top2 = [rec("top2", s, 3.0, router="topk") for s in range(2)]
    study_moving = top2 + [dict(r, loss=2.9 + 0.01 * r["seed"]) for r in moving]
    assert "k_l not settled" in _claims(study_moving)["The learned allocatio"][3]
    assert "k_l not settled" not in _claims(top2 + records)["The learned allocatio"][3]


def test_report_lists_movement_and_stability():
    variants = (SimpleNamespace(name="top2", label="top-k k=2"), SimpleNamespace(name="soft", label="SoftMoE"))
    study = SimpleNamespace(name="fake", variants=variants, references=("top2",),
                            claims=(("top2", "top2"), ("learned", "soft")), paper=PAPER)
    curves = {"train": {"step": [25, 50, 75], "loss": [8.0, 7.0, 7.3]}}
    records = [dict(rec("top2", 0, 3.0, router="topk"), curves=curves, skipped_steps=0),
               dict(rec("soft", 0, 2.9, k_L=[1.0, 3.0]), k_trajectory=_trajectory([2.0, 2.0], [1.0, 3.0], 0.5),
                    curves={"train": {"step": [25, 50], "loss": [8.0, 6.0]}}, skipped_steps=1)]
    md = study_report_markdown(study, records, [], planned=2)
    assert "## How the learned allocation moved" in md
    assert "| SoftMoE | 1 | " in md and "| +0.500, +0.000 | no |" in md
    assert "| top-k k=2 | 1 | +0.300 | 0 |" in md and "| SoftMoE | 1 | -2.000 | 1 |" in md


def test_the_controllers_threshold_is_drawn_only_where_it_moved():
    from softmoe.studies.study_report import _moved_threshold

    moved = [{"step": [1, 2, 3], "threshold": [1.8, 1.7, 1.6]}, {"step": [1, 2, 3], "threshold": [1.8, 1.6, 1.5]}]
    assert _moved_threshold(moved, [1, 3]).tolist() == pytest.approx([1.8, 1.55])
    assert _moved_threshold([{"step": [1, 2], "threshold": [1.8, 1.8]}], [1, 2]) is None  # no controller
    assert _moved_threshold([{"step": [1, 2]}], [1, 2]) is None  # summaries from before it was logged


def test_paper8_study_has_the_issue_variants_seeds_and_scale():
    study = load_study(STUDIES / "paper8.yaml")
    runs = plan_runs(study)
    first = runs[0].config
    assert len(first.model.moe_layers) >= 8 and first.model.num_experts >= 16
    assert runs[0].tokens >= 5_000_000
    seeds = {}
    for run in runs:
        seeds.setdefault(run.variant.name, []).append(run.seed)
    for name in ("topk-k2", "softmoe-K1.5"):
        assert seeds[name] == [0, 1, 2, 3]
    for name in ("topk-k3", "softmoe-K2.0"):
        assert seeds[name] == [0, 1, 2]
    assert {"topk-k1", "topk-k4", "softmoe-star-k1.5", "softmoe-ae2.0", "remoe-k2", "dense",
            "softmoe-star-k1-c4", "softmoe-K1.5-blr30", "softmoe-K2.0-blr30"} <= set(seeds)
    assert [r.variant.name for r in runs[:8]] == ["topk-k2", "softmoe-K1.5"] * 4  # the headline pair first
    dial = {v.name: v.dial for v in study.variants if v.dial}
    assert dial == {"softmoe-K1.5": (1.0, 1.5, 2.0, 3.0), "softmoe-K2.0": (1.0, 1.5, 2.0, 3.0)}
    by_name = {(r.variant.name, r.seed): r.config for r in runs}
    assert by_name[("softmoe-ae2.0", 0)].train.ae_target == 2.0
    assert by_name[("softmoe-star-k1-c4", 0)].model.routed_router_config().cap_factor == 4.0
    # the same batches per seed: every variant's data config and token count are the same at a seed
    assert len({(r.seed, r.config.data) for r in runs}) == 4
    assert by_name[("softmoe-K1.5-blr30", 0)].train.budget_lr_mult == 3 * first.train.budget_lr_mult
    assert study.summaries.parts[-2:] == ("results", "paper8") and study.references == ("topk-k2", "topk-k3")


def test_the_paper_numbers_and_margins_come_from_the_study_file(tmp_path):
    assert PAPER.margin == 0.02 and PAPER.number("infer_vs_train") == "OWT: 1.63 train vs 1.96 infer"
    records = [rec("top2", s, 3.0 + 0.1 * s, router="topk") for s in range(3)] + \
              [rec("soft", s, 3.015 + 0.1 * s + 0.001 * s, train_ae=1.6, infer_ae=1.9, k_L=[1.5] * 4) for s in range(3)]
    row = _claims(records)["LM loss comparable"]
    assert row[1] == PAPER.number("loss_vs_top2") and row[3].startswith("yes (comparable: interval below +0.02)")
    strict = PaperClaims.from_mapping({"margin": 0.01, "best_margin": 0, "accuracy_margin": 0.01, "late_share": 0.5,
                                       "numbers": {"loss_vs_top2": "made up"}})
    row = claims_rows(records, {"top2": "top2", "learned": "soft"}, strict)[0]
    assert row[1] == "made up" and row[3] == "no (higher loss)"  # the same runs, the stricter margin
    assert claims_rows(records, {"top2": "top2", "learned": "soft"}, strict)[-1][1] == "-"  # no number given
    with pytest.raises(ValueError, match="margin"):
        PaperClaims.from_mapping({"margin": 0.02})
    study = SimpleNamespace(name="fake", variants=(SimpleNamespace(name="top2", label="top-2"),), references=(),
                            claims=(), paper=None)
    assert "## Paper's claims" not in study_report_markdown(study, records, [], planned=6)  # no paper: no claims
    raw = yaml.safe_load((STUDIES / "paper8.yaml").read_text())
    del raw["paper"]  # claims without the paper's numbers (paper32: its verdicts.md holds the registered verdicts)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert load_study(tmp_path / "s.yaml").paper is None and load_study(STUDIES / "paper32.yaml").paper is None
