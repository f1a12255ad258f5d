"""Reading a committed run summary (softmoe/studies/summaries.py `load_summary`): a damaged one is named with
what is wrong, never a KeyError later.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_summaries.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softmoe.studies.summaries import load_summary, summary_path

COMMITTED = sorted((Path(__file__).resolve().parents[3] / "docs" / "results" / "paper32" / "runs").glob("*.json"))


@pytest.mark.skipif(not COMMITTED, reason="no committed paper32 summary")
@pytest.mark.parametrize("damage, message", [
    (lambda d: d.pop("record"), r"lacks \['record'\]"),
    (lambda d: d.pop("curves"), r"lacks \['curves'\]"),
    (lambda d: d.update(run=None), r"lacks \['run'\]"),
    (lambda d: d.update(format=99), "format 99"),
])
def test_a_damaged_summary_is_named_with_what_it_lacks(tmp_path, damage, message):
    summary = json.loads(COMMITTED[0].read_text())
    assert load_summary(COMMITTED[0].parent.parent, summary["run"]) == summary  # the committed one reads
    damage(summary)
    path = summary_path(tmp_path, "damaged")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=message) as caught:
        load_summary(tmp_path, "damaged")
    assert str(path) in str(caught.value) and "delete it or pass --force" in str(caught.value)


def test_force_says_which_damaged_summary_it_drops(tmp_path, capsys):
    from softmoe.studies.plan import load_study, plan_runs
    from softmoe.studies.run import _missing

    studies = Path(__file__).resolve().parents[3] / "configs" / "studies"
    study = load_study(studies / "tiny.yaml", out_dir=tmp_path / "out", summaries=tmp_path / "sum")
    runs = plan_runs(study)
    path = summary_path(study.summaries, runs[0].config.train.name)
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "run"')  # truncated by a kill
    with pytest.raises(ValueError, match="unreadable run summary"):
        _missing(study, runs, force=False)
    done, todo = _missing(study, runs, force=True)
    assert not done and todo == runs
    assert f"--force: {path}: unreadable run summary" in capsys.readouterr().out
