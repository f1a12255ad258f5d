"""End to end on the tiny preset: the loss falls, resume is bitwise exact, a corrupt checkpoint is
rejected and the previous one used, non-finite steps are skipped, and the CLI exits 0.

Run: .venv/bin/python -m pytest -q tests/e2e/test_smoke.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from softmoe.cli import main
from softmoe.train.checkpoint import list_checkpoints
from softmoe.train.config import load_run_config
from softmoe.train.loop import Trainer
from softmoe.train.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def tiny(out_dir: Path, data_dir: Path, *overrides: str, variant: str = "softmoe"):
    return load_run_config(CONFIGS / "tiny" / f"{variant}.yaml", [
        f"train.out_dir={out_dir}", f"data.data_dir={data_dir}", "train.progress=false",
        "train.tensorboard=false", *overrides])


def quiet(_message: str) -> None:
    pass


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# Exactness runs: 12 steps, 2 micro-batches per step, checkpoints every 4 steps.
EXACT = ("train.steps=12", "train.grad_accum=2", "train.ckpt_every=4", "train.keep_last=5", "train.eval_every=0",
         "train.eval_batches=1")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir) -> dict[str, torch.Tensor]:
    """Parameters after 12 uninterrupted steps: the reference the resumed runs must match bit for bit."""
    trainer = Trainer(tiny(tmp_path_factory.mktemp("straight"), data_dir, *EXACT), report=quiet)
    trainer.fit()
    return state_of(trainer)


@pytest.mark.parametrize("variant", ["softmoe", "topk", "dense"])
def test_tiny_training_loss_decreases(tmp_path, data_dir, variant):
    result = Trainer(tiny(tmp_path, data_dir, "train.tensorboard=true", variant=variant), report=quiet).fit()
    train = read_metrics(result.run_dir, "train")
    val = read_metrics(result.run_dir, "val")
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, (train[0]["loss"], train[-1]["loss"])
    assert val[-1]["loss"] < val[0]["loss"]
    assert result.val_loss == pytest.approx(val[-1]["loss"]) and result.tokens_per_sec > 0
    assert (Path(result.run_dir) / "tensorboard").is_dir()
    if variant == "softmoe":
        assert len(train[-1]["layers"]) == 2
        assert sum(layer["k"] for layer in train[-1]["layers"]) / 2 == pytest.approx(2.0, abs=1e-5)
        assert result.mean_active_experts >= 1.0


def test_resume_is_bitwise_exact(tmp_path, data_dir, straight_run):
    config = tiny(tmp_path, data_dir, *EXACT)
    first = Trainer(config, report=quiet).fit(stop_after=6)
    assert first.step == 6
    second = Trainer(config, report=quiet)
    result = second.fit(resume=True)
    assert result.step == 12
    assert_bitwise_equal(state_of(second), straight_run)
    steps = [r["step"] for r in read_metrics(tmp_path / config.train.name, "train")]
    assert steps == sorted(set(steps))  # records after the resumed step were not duplicated
    again = Trainer(config, report=quiet)
    assert again.fit(resume=True).step == 12  # a finished run resumes to itself, unchanged
    assert_bitwise_equal(state_of(again), straight_run)


def test_corrupt_checkpoint_is_rejected_and_previous_used(tmp_path, data_dir, straight_run):
    config = tiny(tmp_path, data_dir, *EXACT)
    Trainer(config, report=quiet).fit(stop_after=8)
    ckpts = list_checkpoints(tmp_path / config.train.name / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000004", "step_0000008"]
    weights = ckpts[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    weights.write_bytes(bytes(data))

    reports: list[str] = []
    trainer = Trainer(config, report=reports.append)
    trainer.fit(resume=True)
    assert any("step_0000008" in r and "sha256 mismatch" in r for r in reports), reports
    assert any("resumed from" in r and "step_0000004" in r for r in reports), reports
    assert_bitwise_equal(state_of(trainer), straight_run)  # resuming from step 4 is exact too


def test_non_finite_steps_are_skipped_then_abort(tmp_path, data_dir):
    trainer = Trainer(tiny(tmp_path, data_dir, "train.steps=6", "train.max_bad_steps=1"), report=quiet)
    original = trainer.model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 5, 6):  # the 3rd step, then the 5th and 6th in a row
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = poisoned
    before = state_of(trainer)
    for step in range(2):
        trainer.train_step(step)
    after_two = state_of(trainer)
    stats = trainer.train_step(2)
    assert stats.skipped
    assert_bitwise_equal(state_of(trainer), after_two)  # the NaN step left the weights alone
    assert all(torch.isfinite(v).all() for v in after_two.values())
    assert not torch.equal(after_two["embed.weight"], before["embed.weight"])  # the good steps did train
    with pytest.raises(RuntimeError, match="consecutive non-finite steps"):
        trainer.fit()


def test_cli_train_then_generate_exit_zero(tmp_path, data_dir, capsys):
    args = ["train", "--config", str(CONFIGS / "tiny" / "softmoe.yaml"), f"train.out_dir={tmp_path}",
            f"data.data_dir={data_dir}", "train.steps=4", "train.tensorboard=false", "train.progress=false"]
    assert main(args) == 0
    run_dir = tmp_path / "tiny-softmoe"
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "Four score", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("Four score")
    assert main(["train", "--config", str(CONFIGS / "tiny" / "softmoe.yaml"), "train.lrr=1"]) == 2
    shutil.rmtree(run_dir / "checkpoints")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x"]) == 2
