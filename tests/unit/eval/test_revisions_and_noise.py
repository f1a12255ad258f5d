"""A study's runs record their code revision and the report refuses a mix; the gate-noise share of Train AE.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_revisions_and_noise.py
"""

from __future__ import annotations

import re

import pytest
import torch

from softmoe.common.revision import code_revision
from softmoe.eval.noise import train_mode_active
from softmoe.studies.summaries import check_revisions
from softmoe.model import GPT, ModelConfig
from softmoe.train.loop import Trainer, read_revisions
from tests.e2e.test_smoke import quiet, tiny


def test_code_revision_of_this_checkout_and_of_a_folder_without_git(tmp_path):
    assert code_revision(tmp_path) == {"commit": None, "dirty": None, "version": code_revision()["version"]}
    rev = code_revision()
    if rev["commit"] is None:
        pytest.skip("not a git checkout (an installed wheel)")
    assert re.fullmatch(r"[0-9a-f]{40}", rev["commit"]) and isinstance(rev["dirty"], bool)


def test_every_training_session_appends_its_revision(tmp_path):
    config = tiny(tmp_path / "runs", tmp_path / "data", "train.steps=4", "train.ckpt_every=2")
    Trainer(config, report=quiet).fit(stop_after=2)
    Trainer(config, report=quiet).fit(resume=True)
    sessions = read_revisions(config.train.run_dir)
    assert [s["step"] for s in sessions] == [0, 2]
    assert all({"commit", "dirty", "version"} <= set(s) for s in sessions)
    Trainer(config, report=quiet).fit(overwrite=True)  # a fresh start forgets the earlier attempt's sessions
    assert [s["step"] for s in read_revisions(config.train.run_dir)] == [0]


def rev(*commits: str, dirty: bool = False) -> dict:
    return {"commits": list(commits), "dirty": dirty, "sessions": []}


@pytest.mark.parametrize("runs, allow_dirty, message", [
    ([("a", rev("c1")), ("b", rev("c1"))], False, None),
    ([("a", None), ("b", None)], False, None),  # nothing recorded (older studies): nothing to compare
    ([("a", rev("c1")), ("b", rev("c2"))], True, "trained by 2 commits"),
    ([("a", rev("c1", "c2"))], True, "trained by 2 commits"),  # one run resumed under another commit
    ([("a", rev("c1")), ("b", None)], True, "1 run(s) record no code revision (b)"),
    ([("a", rev("c1", dirty=True))], True, None),
    ([("a", rev("c1", dirty=True))], False, "1 run(s) were trained with local edits (a)"),
])
def test_check_revisions(runs, allow_dirty, message):
    got = check_revisions(runs, allow_dirty=allow_dirty)
    assert got == message if message is None else message in got


def test_train_mode_count_with_the_noise_off_is_the_eval_count_and_the_noise_moves_it():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=16, d_expert=16,
                            k=1.5, router_options={"gate_noise": 1.0}))
    batches = [(torch.randint(0, 64, (4, 16)), None) for _ in range(3)]
    off = train_mode_active(model, batches, noise=False)
    on = train_mode_active(model, batches, noise=True)
    model.eval()
    with torch.no_grad():
        eval_L = [0.0, 0.0]
        for idx, _ in batches:
            out = model(idx)
            eval_L = [a + float(s["active_experts_mean"]) / 3 for a, s in zip(eval_L, out.routing.values())]
    assert off == pytest.approx(eval_L, abs=1e-6)
    assert sum(on) > sum(off)  # noise of std 1 on flat logits spreads them: more experts pass the threshold
    assert model.training is False and all(r.config.gate_noise == 1.0 for r in
                                           (b.ffn.router for b in model.blocks if b.is_moe))
    assert train_mode_active(model, batches, noise=True) == on  # seeded: the same noise
