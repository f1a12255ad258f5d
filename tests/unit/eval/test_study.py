"""Study files: parsing, the planned runs (same data and tokens for every variant), the dry-run text, errors.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_study.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from softmoe.studies.plan import describe_plan, load_study, plan_runs
from softmoe.studies.run import run_study

STUDIES = Path(__file__).resolve().parents[3] / "configs" / "studies"


def write_study(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((STUDIES / "tiny.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_small_study_lists_the_issue_variants_with_three_seeds():
    study = load_study(STUDIES / "small.yaml")
    assert study.seeds == (0, 1, 2)
    runs = plan_runs(study)
    seeds = {name: sorted(r.seed for r in runs if r.variant.name == name) for name in {r.variant.name for r in runs}}
    main = ["dense", "topk-k1", "topk-k2", "topk-k4", "softmoe-K1.0", "softmoe-K1.5", "softmoe-K2.0",
            "topp-p0.4", "null-k4-n8", "remoe-k2"]
    assert all(seeds[name] == [0, 1, 2] for name in main)
    ablations = sorted(set(seeds) - set(main))
    assert len(ablations) == 7 and all(seeds[name] == [0] for name in ablations)
    assert {r.variant.name for r in runs[-7:]} == set(ablations)  # ablations run after every main seed
    models = {run.variant.name: run.config.model for run in runs if run.seed == 0}
    assert models["dense"].ffn == "dense"
    assert [models[f"topk-k{k}"].k for k in (1, 2, 4)] == [1, 2, 4]
    assert all(models[f"topk-k{k}"].router == "topk" and models[f"topk-k{k}"].num_experts == 8 for k in (1, 2, 4))
    assert [models[f"softmoe-K{k}"].k for k in ("1.0", "1.5", "2.0")] == [1.0, 1.5, 2.0]
    assert models["topp-p0.4"].router == "topp" and models["null-k4-n8"].router == "null"
    assert models["remoe-k2"].router == "remoe" and models["remoe-k2"].k == 2
    assert models["softmoe-K2.0-combine-p"].router_options.combine == "p"
    assert models["softmoe-K2.0-fixed-k"].budget_options.learnable is False
    assert models["softmoe-K2.0-budget-lr10"].k == 2.0 and runs[-2].config.train.budget_lr_mult == 10.0
    assert {models[n].router_options.alpha for n in ("softmoe-K2.0-alpha0.03", "softmoe-K2.0-alpha0.3")} == \
        {0.03, 0.3}
    assert len({run.tokens for run in runs}) == 1 and runs[0].tokens == 120 * 16 * 256
    names = [run.config.train.name for run in runs]
    assert len(set(names)) == len(names) and names[0] == "small-dense-s0"


def test_dry_run_tells_a_fixed_k_from_a_learned_budget_and_lists_options_and_targets(tmp_path):
    variants = yaml.safe_load((STUDIES / "tiny.yaml").read_text())["variants"] + [
        {"name": "star", "overrides": {"model.k": 1.5, "model.budget_options.learnable": False}},
        {"name": "dense", "overrides": {"model.ffn": "dense"}},
        {"name": "c4", "overrides": {"model.k": 1.0, "model.router_options.cap_factor": 4.0}},
        {"name": "held", "overrides": {"train.ae_target": 2.0, "train.ae_lever": "threshold"}}]
    study = load_study(write_study(tmp_path, variants=variants), out_dir=tmp_path / "out")
    rows = {line.split()[0]: line for line in describe_plan(study, plan_runs(study)).splitlines()[1:-1]}
    assert " softmoe soft mass K=1 of 8, learned k_l, cap_factor=4 " in rows["tiny-c4-s0"]  # options are listed
    assert " softmoe soft mass K=2 of 8, learned k_l, Train AE -> 2 by threshold " in rows["tiny-held-s0"]
    assert " softmoe soft mass K=2 of 8, learned k_l " in rows["tiny-softmoe-s0"]
    assert " softmoe fixed soft mass k=1.5 of 8 " in rows["tiny-star-s0"] and "learned" not in rows["tiny-star-s0"]
    assert " topk k=2 of 8 " in rows["tiny-topk-s0"] and " dense " in rows["tiny-dense-s0"]
    assert len({line.index(" steps") for line in rows.values()}) == 1  # one column for every row


def test_a_variant_may_run_a_subset_of_the_seeds_after_the_others(tmp_path):
    raw = yaml.safe_load((STUDIES / "tiny.yaml").read_text())
    raw["variants"][0]["seeds"] = [1]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    runs = plan_runs(load_study(path))
    assert [(r.variant.name, r.seed) for r in runs] == [("topk", 0), ("topk", 1), ("softmoe", 1)]


def test_plan_sets_seeds_names_and_out_dir(tmp_path):
    study = load_study(STUDIES / "tiny.yaml", out_dir=tmp_path / "out")
    runs = plan_runs(study, ("train.steps=3",))
    assert [(r.variant.name, r.seed) for r in runs] == [("softmoe", 0), ("topk", 0), ("softmoe", 1), ("topk", 1)]
    for run in runs:
        assert run.config.train.seed == run.config.data.seed == run.seed
        assert run.config.train.run_dir == tmp_path / "out" / f"tiny-{run.variant.name}-s{run.seed}"
        assert run.config.train.steps == 3
    text = describe_plan(study, runs)
    assert "4 runs" in text and f"{3 * 8 * 32:,} per run" in text and text.count(" new") == 4


def test_study_paths_are_relative_to_the_current_directory_with_presets_as_fallback(tmp_path, monkeypatch):
    """Run from outside a clone (or from an installed wheel): the study and its base preset are found among the
    presets, and its runs and summaries go under the current directory, as `--out` and train.out_dir do."""
    monkeypatch.chdir(tmp_path)
    study = load_study("configs/studies/tiny.yaml")
    assert study.path == STUDIES / "tiny.yaml" and study.base == STUDIES.parent / "tiny" / "softmoe.yaml"
    assert study.out_dir == Path("runs/studies/tiny") and not study.out_dir.is_absolute()
    assert load_study("studies/tiny.yaml").path == study.path  # a preset name, as `--config tiny/softmoe`
    run = plan_runs(study)[0]
    assert run.config.train.run_dir.resolve() == tmp_path / "runs" / "studies" / "tiny" / "tiny-softmoe-s0"
    (tmp_path / "configs" / "tiny").mkdir(parents=True)  # a base preset of the user's own shadows the packaged one
    own = tmp_path / "configs" / "tiny" / "softmoe.yaml"
    own.write_text((STUDIES.parent / "tiny" / "softmoe.yaml").read_text())
    assert load_study("configs/studies/tiny.yaml").base == Path("configs/tiny/softmoe.yaml")
    assert load_study(STUDIES / "paper32.yaml").summaries == Path("docs/results/paper32")
    mine = tmp_path / "mine"  # a study with its base beside it, run from elsewhere
    mine.mkdir()
    (mine / "base.yaml").write_text((STUDIES.parent / "tiny" / "softmoe.yaml").read_text())
    raw = yaml.safe_load((STUDIES / "tiny.yaml").read_text())
    (mine / "study.yaml").write_text(yaml.safe_dump({**raw, "base": "base.yaml"}))
    monkeypatch.chdir(tmp_path / "configs")
    assert load_study(mine / "study.yaml").base == mine / "base.yaml"


@pytest.mark.parametrize("changes, match", [
    ({"seeds": []}, "seeds=\\[\\]"),
    ({"seeds": [0, 0]}, "seeds=\\[0, 0\\]"),
    ({"variants": [{"name": "x", "seeds": [5]}]}, "variants\\[0\\].seeds=\\[5\\] must be a subset"),
    ({"variants": [{"name": "x", "seeds": []}]}, "variants\\[0\\].seeds=\\[\\]"),
    ({"name": "a b"}, "name='a b'"),
    ({"base": "configs/tiny/nope.yaml"}, "does not exist"),
    ({"variants": []}, "variants=\\[\\]"),
    ({"variants": [{"name": "x"}, {"name": "x"}]}, "must be distinct"),
    ({"variants": [{"name": "x", "overrides": {"model.routr": "topk"}}]}, "variant 'x'.*model.routr"),
    ({"variants": [{"name": "x", "overrides": {"train.steps": 5}}, {"name": "y"}]}, "same data and token budget"),
    ({"eval": {"budgets": [1.0, 2.0]}}, "eval=.*budget dial"),
    ({"eval": {"tasks": ["piqa"], "limit": 0}}, "limit=0"),
    ({"eval": {"splits": ["dev"]}}, "splits="),
    ({"colour": "red"}, "unknown keys \\['colour'\\]"),
])
def test_bad_study_files_raise_value_errors_naming_the_key(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        plan_runs(load_study(write_study(tmp_path, **changes)))


def _record(variant: str, seed: int, piqa_acc: float, arc_acc: float, lambada_ppl: float) -> dict:
    task = {"n": 10, "acc_norm": 0.5, "perplexity": None, "active_experts_mean": 2.0}
    return {"variant": variant, "seed": seed, "loss": 6.0 + seed, "perplexity": 400.0, "bits_per_byte": None,
            "active_experts_mean": 2.0, "expert_flops_per_token": 1e6, "tokens_per_sec": 1000.0,
            "expert_equivalents": 2.0, "causal": True, "router": "topk",
            "tasks": {"piqa": {**task, "acc": piqa_acc}, "arc_easy": {**task, "acc": arc_acc},
                      "lambada": {**task, "acc": 0.1, "acc_norm": None, "perplexity": lambada_ppl}}}


def test_zero_shot_tasks_are_aggregated_over_seeds_and_tabulated(tmp_path):
    from softmoe.studies.results import _aggregate, results_markdown

    study = load_study(write_study(tmp_path, eval={"splits": ["val"], "tasks": ["piqa", "arc_easy", "lambada"],
                                                   "limit": 10}))
    assert study.evaluation.tasks == ("piqa", "arc_easy", "lambada") and study.evaluation.limit == 10
    records = [_record("softmoe", 0, 0.6, 0.2, 100.0), _record("softmoe", 1, 0.8, 0.4, 300.0),
               _record("topk", 0, 0.5, 0.3, 50.0)]
    rows = {row["variant"]: row for row in _aggregate(records, study.variants)}
    soft = rows["softmoe"]
    assert soft["tasks"]["piqa"]["acc"]["mean"] == pytest.approx(0.7)
    assert soft["tasks"]["piqa"]["acc"]["std"] == pytest.approx(0.1414213562)
    assert soft["tasks"]["lambada"]["perplexity"]["mean"] == pytest.approx(200.0)
    # mean acc over the multiple-choice tasks (not LAMBADA) per run: 0.4 and 0.6
    assert soft["mean_choice_acc"]["mean"] == pytest.approx(0.5)
    assert rows["topk"]["mean_choice_acc"] == {"mean": pytest.approx(0.4), "std": None}
    md = results_markdown(study, plan_runs(study), list(rows.values()), [])
    assert "## Zero-shot tasks" in md and "(at most 10 each, the first of the split)" in md
    assert "| variant | arc_easy | lambada | piqa | mean acc (arc_easy, piqa) |" in md
    assert "| SoftMoE K=2 of 8 | 0.300 ± 0.141 / 0.500 ± 0.000 | 0.100 ± 0.000 / ppl 200 ± 141 | " \
           "0.700 ± 0.141 / 0.500 ± 0.000 | 0.5000 ± 0.1414 |" in md
    assert "| top-k k=2 of 8 | 0.300 / 0.500 | 0.100 / ppl 50 | 0.500 / 0.500 | 0.4000 |" in md


def test_without_tasks_there_is_no_zero_shot_section(tmp_path):
    from softmoe.studies.results import _aggregate, results_markdown

    study = load_study(write_study(tmp_path))
    records = [{**_record("topk", 0, 0.5, 0.3, 50.0), "tasks": {}}]
    md = results_markdown(study, plan_runs(study), _aggregate(records, study.variants), [])
    assert "Zero-shot" not in md


def test_a_reference_variant_gives_paired_loss_differences(tmp_path):
    from softmoe.studies.results import _aggregate, results_markdown

    study = load_study(write_study(tmp_path, reference="topk"))
    assert study.reference == "topk"
    records = [_record("softmoe", 0, 0.5, 0.5, 1.0), _record("softmoe", 1, 0.5, 0.5, 1.0),
               _record("topk", 0, 0.5, 0.5, 1.0), _record("topk", 1, 0.5, 0.5, 1.0)]
    records[0]["loss"], records[1]["loss"], records[2]["loss"], records[3]["loss"] = 6.0, 6.5, 6.2, 6.4
    rows = {row["variant"]: row for row in _aggregate(records, study.variants, study.reference)}
    delta = rows["softmoe"]["loss_vs_reference"]
    assert delta["mean"] == pytest.approx(-0.05) and delta["std"] == pytest.approx(0.2121320344)
    assert (delta["seeds"], delta["lower"]) == (2, 1) and rows["topk"]["loss_vs_reference"] is None
    md = results_markdown(study, plan_runs(study), list(rows.values()), [])
    assert "| Δ val loss vs top-k k=2 of 8 |" in md
    assert "| -0.0500 ± 0.2121 (lower in 1/2) |" in md and "| (reference) |" in md
    with pytest.raises(ValueError, match="reference='nope' must name one of the variants"):
        load_study(write_study(tmp_path, reference="nope"))


def test_small_long_study_trains_three_times_the_tokens_of_small():
    long_runs = plan_runs(load_study(STUDIES / "small-long.yaml"))
    short_runs = plan_runs(load_study(STUDIES / "small.yaml"))
    assert [r.variant.name for r in long_runs] == ["topk-k1", "topk-k2", "softmoe-K1.0", "softmoe-K1.5"]
    assert long_runs[0].tokens == 3 * short_runs[0].tokens
    assert load_study(STUDIES / "small-long.yaml").reference == "topk-k2"


def test_run_study_checks_jobs_and_next_runs_before_running_anything(tmp_path):
    study = load_study(STUDIES / "tiny.yaml", out_dir=tmp_path / "out")
    for kwargs, error, match in ((dict(jobs=0), ValueError, "jobs=0 must be an int >= 1"),
                                 (dict(jobs=2.0), TypeError, "jobs=2.0 must be an int >= 1"),
                                 (dict(next_runs=-1), ValueError, "next_runs=-1 must be None or an int >= 0"),
                                 (dict(next_runs="2"), TypeError, "next_runs='2' must be None or an int >= 0")):
        with pytest.raises(error, match=match):
            run_study(study, **kwargs)
    assert not (tmp_path / "out").exists()
