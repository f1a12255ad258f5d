"""Registered verdicts (softmoe/studies/verdicts.py): each kind on hand-made records whose intervals are worked out
here by hand, and paper32's transcription checked against its registered text (every variant and number of a
check appears in the rule it transcribes, so the transcription cannot drift from the registration)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from softmoe.studies.verdicts import (KINDS, analysis_path, evaluate_rules, interpolate, load_analysis, loss_claim,
                                   verdicts_markdown)

ROOT = Path(__file__).resolve().parents[3]
STUDY = ROOT / "configs" / "studies" / "paper32.yaml"
T2 = 4.303  # t_{0.975, 2}: three seeds


def _rec(variant: str, seed: int, **fields) -> dict:
    return {"variant": variant, "seed": seed, **fields}


def _check(kind: str, records: list[dict], margin: float = 0.02, planned=None, **check):
    return KINDS[kind]("rule", {"kind": kind, **check}, records, margin, planned)


def _losses(variant: str, values: list[float], **extra) -> list[dict]:
    return [_rec(variant, s, loss=v, **extra) for s, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------- the kinds


@pytest.mark.parametrize("diffs, expected", [
    ([0.010, 0.012, 0.008], "comparable"),    # mean 0.010, half-width T2 * 0.002 / sqrt(3) = 0.005: [0.005, 0.015]
    ([-0.030, -0.020, -0.025], "better"),     # [-0.037, -0.013]
    ([0.050, 0.060, 0.055], "worse"),         # [0.043, 0.067], above +0.02
    ([0.000, 0.040, 0.020], "not resolved"),  # half-width 4.303 * 0.02 / 1.732 = 0.050: spans the margin
])
def test_paired_loss_follows_the_registered_rule(diffs, expected):
    records = _losses("ref", [3.0, 3.1, 3.2]) + _losses("v", [3.0 + diffs[0], 3.1 + diffs[1], 3.2 + diffs[2]])
    (verdict,) = _check("paired_loss", records, variant="v", reference="ref", seeds=[0, 1, 2])
    assert verdict.verdict == expected and verdict.seeds == 3 and not verdict.provisional


def test_one_seed_is_not_resolved_and_missing_runs_not_measured():
    records = _losses("ref", [3.0]) + _losses("v", [2.9])
    (one,) = _check("paired_loss", records, variant="v", reference="ref", seeds=[0, 1, 2, 3, 4, 5])
    assert one.verdict == "not resolved (one seed)" and one.provisional
    (none,) = _check("paired_loss", records, variant="absent", reference="ref", seeds=[0, 1, 2])
    assert none.verdict == "not yet measured" and not none.provisional


def test_loss_claim_edges():
    assert loss_claim({"mean": 0.0, "low": -0.01, "high": 0.0199, "n": 3}, 0.02) == "comparable"
    assert loss_claim({"mean": 0.01, "low": -0.01, "high": 0.02, "n": 3}, 0.02) == "not resolved"


def test_fewer_and_inside():
    ae = [1.80, 1.85, 1.90]  # mean 1.85, sd 0.05, half 4.303 * 0.05 / 1.732 = 0.124: [1.726, 1.974]
    records = [_rec("v", s, active_experts_mean=a, train_ae=a) for s, a in enumerate(ae)]
    (below,) = _check("below", records, variant="v", metric="infer_ae", value=2, seeds=[0, 1, 2])
    assert below.verdict == "fewer"
    (inside,) = _check("inside", records, variant="v", metric="train_ae", range=[1.5, 2.0], seeds=[0, 1, 2])
    assert inside.verdict == "as the paper"
    (over,) = _check("inside", records, variant="v", metric="train_ae", range=[1.4, 1.7], seeds=[0, 1, 2])
    assert over.verdict == "above"
    (overlap,) = _check("inside", records, variant="v", metric="train_ae", range=[1.4, 1.8], seeds=[0, 1, 2])
    assert overlap.verdict == "overlapping"
    high = [_rec("v", s, active_experts_mean=a) for s, a in enumerate([2.4, 2.5, 2.6])]
    assert _check("below", high, variant="v", metric="infer_ae", value=2)[0].verdict == "not fewer"


def test_scale_and_same_claim():
    records = (_losses("soft", [3.00, 3.10, 3.20]) + _losses("norm", [2.95, 3.04, 3.16])     # d = -0.05, -0.06, -0.04
               + _losses("top2", [3.00, 3.10, 3.20]))
    (scale,) = _check("scale", records, variant="norm", reference="soft", seeds=[0, 1, 2])
    assert scale.verdict == "output scale matters"   # [-0.075, -0.025] excludes 0
    (same,) = _check("same_claim", records, variant="norm", like="soft", reference="top2", seeds=[0, 1, 2])
    # norm - top2 is "better", soft - top2 is exactly 0 (sd 0: the interval is [0, 0], "comparable")
    assert "better" in same.check and "comparable" in same.check and same.verdict == "about output scale"


def test_gap_noise():
    # gaps 0.10, 0.12, 0.08 (excludes 0); noise effects -0.10, -0.11, -0.09: gap + noise 0, 0.01, -0.01 (contains 0)
    records = [_rec("v", s, active_experts_mean=2.0 + g, train_ae_last=2.0, train_mode_ae_noise_on=2.0 + n,
                    train_mode_ae_noise_off=2.0)
               for s, (g, n) in enumerate([(0.10, -0.10), (0.12, -0.11), (0.08, -0.09)])]
    (explained,) = _check("gap_noise", records, variants=["v"])
    assert explained.verdict == "the noise explains the gap" and "paper's direction" in explained.measured
    for r in records:
        r["train_mode_ae_noise_on"] = 2.0  # no noise effect: the gap stays
    assert _check("gap_noise", records, variants=["v"])[0].verdict == "not the noise"
    flat = [_rec("v", s, active_experts_mean=2.0 + g, train_ae_last=2.0) for s, g in enumerate([0.01, -0.01, 0.0])]
    assert _check("gap_noise", flat, variants=["v"])[0].verdict == "no gap"


def test_a_check_without_seeds_registers_the_variants_planned_seeds():
    """gap_noise lists no seeds ("interval over seeds per SoftMoE variant"): a variant with 2 of its 3 planned
    seeds is provisional, one with all 6 of its planned seeds is not (paper32's verdicts.md had printed the
    realized-budget variant's 2-seed verdict without the mark)."""
    records = [_rec(v, s, active_experts_mean=2.1 + 0.01 * s, train_ae_last=2.0)
               for v, seeds in (("short", [0, 1]), ("full", range(6))) for s in seeds]
    analysis = {"rules": {"train_vs_infer": [{"kind": "gap_noise", "variants": ["short", "full"]}]}}
    short, full = evaluate_rules(analysis, records, 0.02, planned={"short": (0, 1, 2), "full": tuple(range(6))})
    assert (short.seeds, short.registered, short.provisional) == (2, 3, True)
    assert (full.seeds, full.registered, full.provisional) == (6, 6, False)

    # a comparison registers the seeds planned for both sides: 3 here, so 3 shared seeds are final
    records = _losses("ref", [3.0, 3.1, 3.2]) + _losses("v", [3.0, 3.1, 3.2, 3.3, 3.4, 3.5])
    (paired,) = _check("paired_loss", records, planned={"v": tuple(range(6)), "ref": (0, 1, 2)}, variant="v",
                       reference="ref")
    assert (paired.seeds, paired.registered, paired.provisional) == (3, 3, False)


@pytest.mark.parametrize("late, expected", [
    ([4.0, 4.0, 4.0], "as the paper"),             # share 12 / 22 = 0.545 every seed
    ([2.0, 2.0, 2.0], "uniform"),                  # 6 / 16 = 0.375 exactly, zero width: contains 0.375
    ([1.0, 1.0, 1.0], "early"),                    # 3 / 13 = 0.231
    ([2.4, 2.5, 2.3], "later, less than the paper"),  # shares 0.419, 0.429, 0.408: mean 0.419 < 0.4375, low > 0.375
])
def test_late_share(late, expected):
    records = [_rec("v", s, k_L=[2.0] * 5 + [v] * 3) for s, v in enumerate(late)]
    (verdict,) = _check("late_share", records, variant="v", of="k_L", last=3, uniform=0.375, paper_halfway=0.4375)
    assert verdict.verdict == expected


def test_held():
    ok = [_rec("v", s, k_L=[1.0, 2.0], train_ae_per_layer=[1.05, 1.97], train_ae=1.51) for s in range(3)]
    assert _check("held", ok, variant="v", layer_tol=0.1, mean_tol=0.05, budget=1.5, seeds=[0, 1, 2])[0].verdict \
        == "held"
    ok[1]["train_ae_per_layer"] = [1.2, 1.97]  # one layer of one seed 0.2 off its k_l
    assert _check("held", ok, variant="v", layer_tol=0.1, mean_tol=0.05, budget=1.5)[0].verdict == "not held"


def test_frontier_per_seed():
    assert interpolate([(1, 3.0), (2, 2.9), (3, 2.85)], 1.5) == (pytest.approx(2.95), False)
    assert interpolate([(1, 3.0), (2, 2.9), (3, 2.85)], 4.0) == (pytest.approx(2.80), True)
    records = []
    for s in range(3):
        records += [_rec("k1", s, loss=3.0 + 0.01 * s), _rec("k2", s, loss=2.9 + 0.01 * s),
                    _rec("k3", s, loss=2.85 + 0.01 * s)]
        records.append(_rec("v", s, loss=2.90 + 0.01 * s + [0.0, 0.002, -0.002][s], active_experts_mean=1.5))
    (verdict,) = _check("frontier", records, topk={"k1": 1, "k2": 2, "k3": 3}, variants=["v"], seeds=[0, 1, 2])
    assert verdict.verdict == "below the frontier"  # -0.05 +- 0.005 under 2.95 (+ 0.01 s)


def test_frontier_through_the_mean_losses():
    """Per seed the frontier at AE 1.5 is 2.95, 2.95, 2.85 and v lies 0.05 under it every seed ("below"). Through
    the mean losses (k1 3.1, k2 2.7333) it is 2.91667 for every seed: deltas -0.01667, -0.01667, -0.11667, mean
    -0.05, SD 0.057735, half-width 4.303 * 0.057735 / sqrt(3) = 0.1434: [-0.193, +0.093], "above"."""
    losses = {"k1": [3.0, 3.2, 3.1], "k2": [2.9, 2.7, 2.6], "v": [2.90, 2.90, 2.80]}
    records = [_rec(name, s, loss=x, active_experts_mean=1.5) for name, xs in losses.items() for s, x in enumerate(xs)]
    check = {"topk": {"k1": 1, "k2": 2}, "variants": ["v"], "seeds": [0, 1, 2]}
    (per_seed,) = _check("frontier", records, **check)
    assert per_seed.verdict == "below the frontier" and "-0.0500 [-0.0500, -0.0500]" in per_seed.measured
    (through_mean,) = _check("frontier", records, through="mean", **check)
    assert through_mean.verdict == "above the frontier" and "mean losses" in through_mean.check
    assert "-0.0500 [-0.1934, +0.0934]" in through_mean.measured
    assert not through_mean.provisional
    short = [r for r in records if not (r["variant"] == "k2" and r["seed"] == 2)]  # one top-k mean on 2 seeds
    (early,) = _check("frontier", short, through="mean", **check)
    assert early.provisional and (early.seeds, early.registered) == (2, 3)


def test_divergence():
    steady = _rec("v", 0, skipped_steps=0, curves={"train": {"step": [25, 50, 125, 150], "loss": [8, 6, 5, 5.9]}})
    (ok,) = _check("divergence", [steady], variants=["v"], seed=0, after_step=100, ratio=1.2)
    assert ok.verdict == "not diverged" and "1.180" in ok.measured
    steady["curves"]["train"]["loss"][3] = 6.1   # 6.1 / 5 = 1.22 after step 100
    assert _check("divergence", [steady], variants=["v"], seed=0, after_step=100, ratio=1.2)[0].verdict.startswith(
        "diverged")
    early = _rec("v", 0, skipped_steps=0, curves={"train": {"step": [25, 50], "loss": [5, 8]}})  # before step 100
    assert _check("divergence", [early], variants=["v"], seed=0, after_step=100, ratio=1.2)[0].verdict \
        == "not diverged"
    assert _check("divergence", [{**early, "skipped_steps": 1}], variants=["v"], seed=0, after_step=100,
                  ratio=1.2)[0].verdict.startswith("diverged")


# ------------------------------------------------------------------------------- paper32's transcription


def _registration() -> dict:
    return yaml.safe_load(STUDY.read_text())["preregistration"]


def _texts(rule: str, registration: dict) -> str:
    text = registration["divergence"] if rule == "divergence" else registration["verdicts"][rule]
    return " ".join(str(text).split())


def _numbers(check: dict) -> list[float]:
    out = []
    for key, value in check.items():
        if key in ("seeds", "seed", "kind", "topk"):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(float(v))
    return out


def _appears(number: float, text: str) -> bool:
    found = [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", text)]
    return any(math.isclose(number, x) for x in found)


def test_paper32_transcription_restates_the_registered_rules():
    from softmoe.studies.plan import load_study

    study = load_study(STUDY)
    analysis = load_analysis(analysis_path(STUDY))
    registration = _registration()
    assert set(analysis["rules"]) == set(registration["verdicts"])  # every registered rule, nothing more
    names = {v.name for v in study.variants}
    assert set(analysis["paper_rows"]) <= set(registration["paper"]) and set(analysis["paper_rows"].values()) <= names
    soft = [v.name for v in study.variants if not v.exploratory and 'model.router="topk"' not in v.overrides]
    checks = [("divergence", c) for c in analysis["divergence"]]
    checks += [(rule, c) for rule, cs in analysis["rules"].items() for c in cs]
    for rule, check in checks:
        text = _texts(rule, registration)
        allocation = " ".join(registration["metrics"]["allocation"].split())
        for number in _numbers(check):
            assert _appears(number, text + " " + allocation), (rule, check, number)
        for key in ("variant", "reference", "like", "loss_rule", "count_rule"):
            if key in check:
                assert check[key] in text or check[key] == rule, (rule, key, check[key])
        if "variants" in check and check["kind"] != "divergence":  # "each SoftMoE variant" / "per SoftMoE variant"
            assert sorted(check["variants"]) == sorted(soft), (rule, check["variants"])
        if "topk" in check:
            assert all(name in text for name in check["topk"]) and list(check["topk"].values()) == [1, 2, 3]
        if "seeds" in check:
            planned = {v.name: v.seeds or study.seeds for v in study.variants}
            names = [check[k] for k in ("variant", "reference", "like") if k in check] + check.get("variants", [])
            if "seeds 0-2" in text:
                assert check["seeds"] == [0, 1, 2], (rule, check)
            else:  # the variant's registered seeds, all of them
                assert all(tuple(check["seeds"]) == tuple(planned[n]) for n in names), (rule, check)


def test_paper32_verdicts_page_from_the_committed_summaries():
    from softmoe.studies.plan import load_study
    from softmoe.studies.summaries import record_of

    study = load_study(STUDY)
    summaries = sorted((ROOT / "docs" / "results" / "paper32" / "runs").glob("*.json"))
    records = [record_of(yaml.safe_load(p.read_text())) for p in summaries]
    text = verdicts_markdown(study, load_analysis(analysis_path(STUDY)), records, planned=30)
    # + divergence, + the paper's numbers, + the exploratory readings (after every registered rule)
    assert text.count("\n## ") == len(_registration()["verdicts"]) + 3
    assert text.index("\n## Exploratory readings (not registered)") > max(
        text.index(f"\n## {rule}\n") for rule in _registration()["verdicts"])
    assert "\n### frontier_through_mean_losses\n" in text and "frontier through the top-k mean losses" in text
    assert "| softmoe_learned_k1.5 | softmoe-K1.5 | 1.63 / " in text and "| top2 | topk-k2 | 2 / 2.000" in text
    for rule in _registration()["verdicts"]:
        assert f"\n## {rule}\n\n> " in text
    verdicts = evaluate_rules(load_analysis(analysis_path(STUDY)), records, margin=0.02)
    divergence = [v for v in verdicts if v.rule == "divergence"]
    assert len(divergence) == 2 and all(v.verdict in ("not diverged", "not yet measured") for v in divergence)


def test_the_study_report_points_to_the_verdicts():
    from softmoe.studies.plan import load_study
    from softmoe.studies.study_report import study_report_markdown

    assert "[verdicts.md](verdicts.md)" in study_report_markdown(load_study(STUDY), [], [], planned=30)


@pytest.mark.parametrize("text, wrong", [
    ("rules: []", "must be a mapping with `rules:`"),
    ("rules: {r: [{kind: nope}]}", "rules.r must be a list of checks"),
    ("rules: {}\nexploratory: {x: {checks: []}}", "exploratory.x must be a mapping with `why:`"),
    ("rules: {}\nexploratory: {x: {why: w, checks: [{kind: nope}]}}", "exploratory.x.checks must be a list of checks"),
    ("rules: {}\nexploratory: [x]", "exploratory must be a mapping"),
    ("rules: {f: [{kind: frontier, through: means}]}", "rules.f: a frontier check's through must be seed or mean"),
])
def test_a_malformed_transcription_is_named(tmp_path, text, wrong):
    path = tmp_path / "s.analysis.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(wrong)):
        load_analysis(path)


@pytest.mark.parametrize("loss, count, expected", [
    ([-0.030, -0.020, -0.025], [1.5, 1.6, 1.55], "the paper's claim holds"),          # better, fewer
    ([0.010, 0.012, 0.008], [1.5, 1.6, 1.55], "the paper's claim holds"),             # comparable, fewer
    ([-0.030, -0.020, -0.025], [2.4, 2.5, 2.45], "the paper's claim does not hold"),  # better, not fewer
    ([0.050, 0.060, 0.055], [1.5, 1.6, 1.55], "the paper's claim does not hold"),     # worse, fewer
    ([0.000, 0.040, 0.020], [1.5, 1.6, 1.55], "not resolved"),                        # not resolved, fewer
])
def test_joint_claim_combines_the_two_registered_verdicts(loss, count, expected):
    records = _losses("ref", [3.0, 3.1, 3.2]) + [_rec("v", s, loss=[3.0, 3.1, 3.2][s] + d, active_experts_mean=a)
                                                   for s, (d, a) in enumerate(zip(loss, count))]
    analysis = {"rules": {
        "loss_rule": [{"kind": "paired_loss", "variant": "v", "reference": "ref", "seeds": [0, 1, 2]}],
        "count_rule": [{"kind": "below", "variant": "v", "metric": "infer_ae", "value": 2, "seeds": [0, 1, 2]},
                       {"kind": "joint_claim", "loss_rule": "loss_rule", "count_rule": "count_rule"}]}}
    *_, joint = evaluate_rules(analysis, records, 0.02)
    assert joint.rule == "count_rule" and joint.verdict == expected and not joint.provisional
    (missing,) = [v for v in evaluate_rules(analysis, [r for r in records if r["variant"] == "ref"], 0.02)
                  if v.check.startswith("loss_rule and")]
    assert missing.verdict == "not yet measured"
