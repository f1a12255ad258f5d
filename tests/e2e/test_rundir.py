"""Run-directory ownership: a run dir keeps one config, one trainer at a time, --resume continues the run's
own config, Ctrl-C checkpoints, a finished run resumes to itself, and the logs after a resume equal the
uninterrupted run's.

Run: .venv/bin/python -m pytest -q tests/e2e/test_rundir.py
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from softmoe.cli import main
from softmoe.train.checkpoint import list_checkpoints
from softmoe.train.loop import Trainer
from softmoe.train.metrics import read_metrics
from softmoe.train.config import load_run_config
from softmoe.train.rundir import RunDirError, RunLock, check_ownership
from tests.e2e.test_smoke import CONFIGS, EXACT, assert_bitwise_equal, quiet, state_of, tiny

TINY = str(CONFIGS / "tiny" / "softmoe.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def train_cli(out_dir: Path, data_dir: Path, *args: str) -> int:
    return main(["train", "--config", TINY, f"train.out_dir={out_dir}", f"data.data_dir={data_dir}",
                 "train.progress=false", "train.tensorboard=false", *args])


def test_a_different_config_is_refused_unless_overwrite(tmp_path, data_dir, capsys):
    assert train_cli(tmp_path, data_dir, "train.steps=4") == 0
    run_dir = tmp_path / "tiny-softmoe"
    before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    # the README's peer line reused the SoftMoE run's name: it must not touch that run
    assert train_cli(tmp_path, data_dir, "train.steps=4", "model.router=remoe") == 2
    err = capsys.readouterr().err
    assert "model.router 'softmoe' -> 'remoe'" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (run_dir / "config.yaml").read_text() == before
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_0000004"]
    # the same config without --resume would retrain over the checkpoints: refused as well
    assert train_cli(tmp_path, data_dir, "train.steps=4") == 2
    assert "--resume" in capsys.readouterr().err
    assert train_cli(tmp_path, data_dir, "train.steps=4", "model.router=remoe", "--overwrite") == 0
    assert "router: remoe" in (run_dir / "config.yaml").read_text()
    assert [r["step"] for r in read_metrics(run_dir, "val")] == [4]  # nothing of the old run is left


def test_saved_config_resolves_router_options(tmp_path, data_dir):
    assert train_cli(tmp_path, data_dir, "train.steps=2") == 0
    import yaml

    saved = yaml.safe_load((tmp_path / "tiny-softmoe" / "config.yaml").read_text())
    assert {"alpha", "min_weight", "combine", "lb_coef"} <= set(saved["model"]["router_options"])
    assert {"k_min", "margin", "mode", "learnable"} <= set(saved["model"]["budget_options"])
    assert train_cli(tmp_path, data_dir, "--resume") == 0  # the resolved config.yaml reads back as the same run


def test_resume_reads_the_runs_own_config(tmp_path, data_dir, capsys):
    assert train_cli(tmp_path, data_dir, "train.steps=12", "train.ckpt_every=4", "--stop-after", "6") == 0
    capsys.readouterr()
    # the preset says steps: 40; the run says 12: --resume continues the run, not the preset
    assert train_cli(tmp_path, data_dir, "--resume", "train.log_every=2") == 0
    assert "done at step 12" in capsys.readouterr().out
    assert_consistent(tmp_path / "tiny-softmoe")
    assert train_cli(tmp_path, data_dir, "--resume", "train.steps=8", "train.lr=0.5") == 2
    err = capsys.readouterr().err
    assert "train.steps 12 -> 8" in err and "train.lr" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("case", ["nothing", "mistyped name", "all corrupt"])
def test_resume_without_a_good_checkpoint_is_an_error(tmp_path, data_dir, capsys, case):
    name = "tiny-softmoe"
    if case != "nothing":
        assert train_cli(tmp_path, data_dir, "train.steps=4", "train.ckpt_every=2") == 0
    if case == "mistyped name":
        name = "tiny-softmo"
    corrupt = []
    if case == "all corrupt":
        for ckpt in list_checkpoints(tmp_path / name / "checkpoints"):
            weights = ckpt / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0x01
            weights.write_bytes(bytes(data))
            corrupt.append((weights, weights.read_bytes()))
    capsys.readouterr()
    assert train_cli(tmp_path, data_dir, f"train.name={name}", "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("softmoe train: ") and str(tmp_path / name) in err[-1], err
    for path, data in corrupt:  # nothing was overwritten
        assert path.read_bytes() == data


def test_second_trainer_is_refused_and_a_crashed_lock_recovered(tmp_path, data_dir):
    config = tiny(tmp_path, data_dir, "train.steps=2")
    with RunLock(config.train.run_dir):
        with pytest.raises(RunDirError, match=f"in use by another trainer \\(pid {os.getpid()} on host"):
            Trainer(config, report=quiet).fit()
    # what a killed trainer leaves: a lock file naming it (its flock died with it) and a half-written checkpoint
    run_dir = config.train.run_dir
    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}) + "\n")
    (run_dir / "checkpoints" / ".tmp-step_0000001-999999").mkdir(parents=True)
    reports: list[str] = []
    assert Trainer(config, report=reports.append).fit().step == 2
    assert any("recovered the lock" in r and "pid 999999" in r for r in reports), reports
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert (run_dir / ".lock").read_text() == ""  # released


def test_ctrl_c_checkpoints_and_resume_is_exact(tmp_path, data_dir, straight_run, monkeypatch, capsys):
    original = Trainer.train_step
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when run as a background job

    def interrupted_at_step_5(self, step, **kwargs):
        stats = original(self, step, **kwargs)
        if step == 4:  # the 5th step: Ctrl-C arrives while it runs
            os.kill(os.getpid(), signal.SIGINT)
        return stats

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_step_5)
    args = [f"train.{kv}" for kv in ("steps=12", "grad_accum=2", "ckpt_every=4", "keep_last=5", "eval_batches=1")]
    assert train_cli(tmp_path, data_dir, *args, "train.eval_every=0") == 130
    assert "interrupted at step 5" in capsys.readouterr().out
    run_dir = tmp_path / "tiny-softmoe"
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == "step_0000005"
    assert not (run_dir / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler given back
    monkeypatch.setattr(Trainer, "train_step", original)
    config = tiny(tmp_path, data_dir, *EXACT)
    resumed = Trainer(config, report=quiet)
    assert resumed.fit(resume=True).step == 12
    assert_bitwise_equal(state_of(resumed), straight_run)
    assert_consistent(run_dir)


@pytest.mark.parametrize("repeat_s, saved", [(2.0, True), (0.0, False)])
def test_sigterm_twice_at_once_is_one_stop(tmp_path, data_dir, monkeypatch, capsys, repeat_s, saved):
    """Killing the process group of `softmoe compare --jobs N` hands each worker SIGTERM twice at once (directly,
    and as its parent-death signal): one request to stop with a checkpoint, not a stop then an abort (the abort
    lost every step since the last checkpoint). With the repeat window at 0 the second SIGTERM aborts, as a
    second Ctrl-C does."""
    import softmoe.train.loop as loop

    monkeypatch.setattr(loop, "SIGTERM_REPEAT_S", repeat_s)
    original = Trainer.train_step
    before = signal.getsignal(signal.SIGTERM)

    def terminated_twice_at_step_5(self, step, **kwargs):
        stats = original(self, step, **kwargs)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    monkeypatch.setattr(Trainer, "train_step", terminated_twice_at_step_5)
    args = ("train.steps=12", "train.ckpt_every=0", "train.eval_every=0")
    if saved:
        assert train_cli(tmp_path, data_dir, *args) == 130
        assert "interrupted at step 5" in capsys.readouterr().out
    else:  # the abort: no checkpoint, the interrupt goes on up (as a second Ctrl-C's does)
        with pytest.raises(KeyboardInterrupt):
            train_cli(tmp_path, data_dir, *args)
    checkpoints = [c.name for c in list_checkpoints(tmp_path / "tiny-softmoe" / "checkpoints")]
    assert checkpoints == (["step_0000005"] if saved else [])
    assert signal.getsignal(signal.SIGTERM) is before  # handler given back


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
    trainer = Trainer(tiny(tmp_path_factory.mktemp("straight"), data_dir, *EXACT), report=quiet)
    trainer.fit()
    return state_of(trainer)


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in records]


def test_logs_after_resume_equal_the_uninterrupted_run(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # resume at step 7: not a multiple of log_every (5) or eval_every (4)
    settings = ("train.steps=12", "train.ckpt_every=7", "train.log_every=5", "train.eval_every=4",
                "train.tensorboard=true", "train.eval_batches=1")
    straight = tiny(tmp_path / "a", data_dir, *settings)
    Trainer(straight, report=quiet).fit()
    config = tiny(tmp_path / "b", data_dir, *settings)
    assert Trainer(config, report=quiet).fit(stop_after=9).step == 9  # a crash after the step-7 checkpoint ...
    ckpts = list_checkpoints(config.train.run_dir / "checkpoints")
    for ckpt in ckpts[1:]:
        import shutil

        shutil.rmtree(ckpt)  # ... left only step 7 (and logs up to step 9)
    assert Trainer(config, report=quiet).fit(resume=True).step == 12
    assert _comparable(read_metrics(config.train.run_dir)) == _comparable(read_metrics(straight.train.run_dir))

    def scalar_steps(run_dir: Path) -> dict[str, list[int]]:
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    assert scalar_steps(config.train.run_dir) == scalar_steps(straight.train.run_dir)


def test_resume_on_a_finished_run_changes_nothing(tmp_path, data_dir):
    config = tiny(tmp_path, data_dir, "train.steps=4")
    Trainer(config, report=quiet).fit()
    run_dir = config.train.run_dir
    files = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    reports: list[str] = []
    result = Trainer(config, report=reports.append).fit(resume=True)
    assert result.step == 4 and result.train_loss is not None and result.tokens_per_sec
    assert {name: (run_dir / name).read_bytes() for name in files} == files
    assert any("nothing to do" in r for r in reports)


@pytest.mark.parametrize("damage", ["corrupt", "deleted", "final val record gone too"])
def test_resume_of_a_finished_run_with_a_lost_summary_rebuilds_it_without_a_duplicate(tmp_path, data_dir, damage):
    """Issue 27, item 12: no second validation record and no nulls; the summary comes back from metrics.jsonl
    (validated once only when its final validation record is gone as well)."""
    config = tiny(tmp_path, data_dir, "train.steps=4")
    original = Trainer(config, report=quiet).fit()
    run_dir = config.train.run_dir
    records = (run_dir / "metrics.jsonl").read_text()
    if damage == "corrupt":
        (run_dir / "summary.json").write_text('{"step": 4, "val_lo')
    else:
        (run_dir / "summary.json").unlink()
    if damage == "final val record gone too":
        kept = [line for line in records.splitlines(keepends=True)
                if not (json.loads(line)["split"] == "val" and json.loads(line)["step"] == 4)]
        (run_dir / "metrics.jsonl").write_text("".join(kept))
    result = Trainer(config, report=quiet).fit(resume=True)
    assert (run_dir / "metrics.jsonl").read_text() == records  # one final validation record, as before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["val_loss"] == original.val_loss == result.val_loss
    assert summary["mean_active_experts"] == original.mean_active_experts
    assert None not in (summary["train_loss"], summary["tokens_per_sec"], summary["train_ae"])


def test_resume_after_metrics_jsonl_was_deleted_is_refused_unless_an_empty_one_says_so(tmp_path, data_dir,
                                                                                         capsys):
    assert train_cli(tmp_path, data_dir, "train.steps=6", "train.ckpt_every=3", "--stop-after", "3") == 0
    metrics = tmp_path / "tiny-softmoe" / "metrics.jsonl"
    metrics.unlink()
    capsys.readouterr()
    assert train_cli(tmp_path, data_dir, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{metrics} is missing" in err and "empty one" in err, err
    assert not metrics.exists()
    metrics.touch()  # continue without the history, on purpose
    assert train_cli(tmp_path, data_dir, "--resume") == 0
    assert min(r["step"] for r in read_metrics(tmp_path / "tiny-softmoe")) > 3


def test_extending_a_finished_run_equals_a_run_planned_with_the_same_schedule(tmp_path, data_dir, capsys):
    """Issue 27, item 7: `--resume train.steps=N` on a run finished at S continues it; the learning-rate schedule
    keeps its end S (train.schedule_steps), so the added steps train at the floor lr, and the result is bitwise
    the run configured with train.steps=N train.schedule_steps=S from the start. The old end's records stay."""
    import yaml

    base = ("train.warmup_steps=2", "train.ckpt_every=4", "train.eval_every=0", "train.eval_batches=1")
    assert train_cli(tmp_path / "a", data_dir, "train.steps=6", *base) == 0
    assert train_cli(tmp_path / "a", data_dir, "train.steps=10", *base, "--resume") == 0
    assert "done at step 10" in capsys.readouterr().out
    run = tmp_path / "a" / "tiny-softmoe"
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (saved["steps"], saved["schedule_steps"]) == (10, 6)
    assert train_cli(tmp_path / "b", data_dir, "train.steps=10", "train.schedule_steps=6", *base) == 0
    planned = tmp_path / "b" / "tiny-softmoe"
    from softmoe.train.checkpoint import load_checkpoint

    extended, _, _ = load_checkpoint(run / "checkpoints" / "step_0000010")
    assert_bitwise_equal(extended, load_checkpoint(planned / "checkpoints" / "step_0000010")[0])
    lrs = {r["step"]: r["lr"] for r in read_metrics(run, "train")}
    planned_lrs = {r["step"]: r["lr"] for r in read_metrics(planned, "train")}
    assert {step: lrs[step] for step in planned_lrs} == planned_lrs  # plus the old end's record at step 6
    assert lrs[10] == pytest.approx(1e-2 * 0.1)  # the floor: lr x min_lr_ratio
    assert [r["step"] for r in read_metrics(run, "val")] == [6, 10]  # the finished run's validation is kept
    assert json.loads((run / "summary.json").read_text())["step"] == 10
    # growing only: fewer steps is a trajectory change
    assert train_cli(tmp_path / "a", data_dir, "train.steps=8", *base, "--resume") == 2
    assert "train.steps 10 -> 8" in capsys.readouterr().err


def test_main_and_compare_start_new_runs_without_a_resume_warning(tmp_path, data_dir, capsys):
    from softmoe.train.runs import train_or_reuse

    config = tiny(tmp_path, data_dir, "train.steps=2")
    train_or_reuse(config)
    assert "--resume" not in capsys.readouterr().out
    train_or_reuse(config)
    assert "already trained to step 2; reusing it" in capsys.readouterr().out


def _rewrite_manifest(ckpt: Path, edit) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _resave(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and make its manifest agree (a writer that wrote garbage)."""
    import hashlib

    (ckpt / name).write_bytes(data)
    _rewrite_manifest(ckpt, lambda m: m["files"][name].update(sha256=hashlib.sha256(data).hexdigest(),
                                                              bytes=len(data)))


DAMAGE = {
    "manifest entry without sha256": lambda c: _rewrite_manifest(c, lambda m: m["files"]["meta.json"].pop("sha256")),
    "manifest files not a mapping": lambda c: _rewrite_manifest(c, lambda m: m.update(files=["meta.json"])),
    "meta.json not JSON": lambda c: _resave(c, "meta.json", b"{ nope"),
    "meta.json without config": lambda c: _resave(c, "meta.json", b'{"step": 8}'),
    "train_state.pt garbage": lambda c: _resave(c, "train_state.pt", b"not a torch file"),
    "weights garbage": lambda c: _resave(c, "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, data_dir, straight_run, damage):
    config = tiny(tmp_path, data_dir, *EXACT)
    Trainer(config, report=quiet).fit(stop_after=8)
    newest = list_checkpoints(config.train.run_dir / "checkpoints")[-1]
    assert newest.name == "step_0000008"
    DAMAGE[damage](newest)
    reports: list[str] = []
    trainer = Trainer(config, report=reports.append)
    trainer.fit(resume=True)
    assert any("checkpoint rejected" in r and "step_0000008" in r for r in reports), reports
    assert any("resumed from" in r and "step_0000004" in r for r in reports), reports
    assert_bitwise_equal(state_of(trainer), straight_run)


def test_a_file_where_a_checkpoint_goes_does_not_break_the_next_save(tmp_path, data_dir):
    import shutil

    config = tiny(tmp_path, data_dir, "train.steps=4", "train.ckpt_every=2")
    Trainer(config, report=quiet).fit(stop_after=2)
    root = config.train.run_dir / "checkpoints"
    (root / "step_0000004").write_text("not a checkpoint")  # where the next save goes
    shutil.copytree(root / "step_0000002", root / "step_0000002.bak")  # noise next to it
    assert Trainer(config, report=quiet).fit(resume=True).step == 4
    assert (root / "step_0000004" / "manifest.json").is_file()


def test_lock_of_a_killed_trainer_is_recovered(tmp_path):
    """A real holder process, killed with SIGKILL: its flock dies with it and the next trainer takes over."""
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from softmoe.train.rundir import RunLock\n"
        f"lock = RunLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"pid {holder.pid} on host"):
            RunLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 30
    notes: list[str] = []
    while True:
        try:
            with RunLock(tmp_path, notes.append):
                break
        except RunDirError:  # the kernel has not released it yet
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert any(f"pid {holder.pid}" in n and "recovered" in n for n in notes), notes


def assert_consistent(run_dir: Path) -> None:
    """What `softmoe generate`, eval and a resume read agrees: config.yaml, the newest checkpoint's config,
    summary.json's step and checkpoint, and the metrics (no record past the newest checkpoint's step)."""
    import yaml

    from softmoe.train.checkpoint import latest_good_checkpoint, load_checkpoint
    from softmoe.train.rundir import config_diff

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    newest = latest_good_checkpoint(run_dir / "checkpoints", quiet)
    _, train_state, meta = load_checkpoint(newest)
    assert [k for k in config_diff(meta["config"], saved) if k.split(".")[1] not in ("progress", "tensorboard")] == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == train_state["step"] == meta["step"] and summary["checkpoint"] == str(newest)
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert max(steps) == summary["step"] and len(steps) == len(set(zip(steps, [r["split"] for r in
                                                                                 read_metrics(run_dir)])))


def test_readme_commands_in_order_leave_every_run_consistent(tmp_path, data_dir, capsys):
    """The README's train / resume / generate / peer lines, on the tiny preset."""
    run = tmp_path / "tiny-softmoe"
    assert train_cli(tmp_path, data_dir, "train.steps=6", "model.router_options.alpha=0.05") == 0
    assert train_cli(tmp_path, data_dir, "--resume") == 0  # finished: nothing changes
    assert main(["generate", "--checkpoint", str(run), "--prompt", "Four score", "--max-new-tokens", "3"]) == 0
    assert train_cli(tmp_path, data_dir, "train.steps=6", "model.router=remoe") == 2  # the old peer line: refused
    assert train_cli(tmp_path, data_dir, "train.steps=6", "model.router=remoe", "train.name=tiny-remoe") == 0
    for run_dir in (run, tmp_path / "tiny-remoe"):
        assert_consistent(run_dir)
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["router_options"]["alpha"] == 0.05


def test_resume_of_a_run_without_config_yaml_uses_its_checkpoint(tmp_path, data_dir, capsys):
    assert train_cli(tmp_path, data_dir, "train.steps=6", "train.ckpt_every=3", "--stop-after", "3") == 0
    (tmp_path / "tiny-softmoe" / "config.yaml").unlink()  # a run directory written before config.yaml existed
    capsys.readouterr()
    assert train_cli(tmp_path, data_dir, "--resume") == 0
    assert "done at step 6" in capsys.readouterr().out


def test_check_ownership_names_a_bad_mode():
    with pytest.raises(ValueError, match="mode='bogus' must be one of"):
        check_ownership(load_run_config(TINY), "bogus", False)
