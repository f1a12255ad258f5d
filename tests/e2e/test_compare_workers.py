"""A killed `softmoe compare --jobs 2` leaves no worker training on: the pool's workers end with their parent
(Linux: PR_SET_PDEATHSIG), each checkpointing its run, so the next compare resumes instead of racing an orphan;
killing its whole process group does the same.

Run: .venv/bin/python -m pytest -q tests/e2e/test_compare_workers.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import procs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _tiny_study(tmp_path: Path, name: str, overrides: str, variants: str) -> Path:
    """study.yaml in `tmp_path`: the tiny preset, one seed, runs and data under `tmp_path`."""
    study = tmp_path / "study.yaml"
    study.write_text(f"""name: {name}
base: {CONFIGS / 'tiny' / 'softmoe.yaml'}
out_dir: {tmp_path / 'runs'}
seeds: [0]
overrides: {{{overrides}, train.progress: false, train.tensorboard: false, data.data_dir: {tmp_path / 'data'}}}
variants:
{variants}""")
    return study


def _start_compare(tmp_path: Path, variants: str) -> tuple[subprocess.Popen, list[int]]:
    """`softmoe compare --jobs 2` on a tiny study of endless runs, in a session of its own with Ctrl-C's default
    action (a background job may inherit SIGINT ignored); returns it and its two workers once both train."""
    study = _tiny_study(tmp_path, "orphans", "train.steps: 100000, train.ckpt_every: 0", variants)
    parent = subprocess.Popen([sys.executable, "-m", "softmoe.cli", "compare", "--config", str(study), "--jobs", "2",
                               "--quiet", "--summaries", "none"], stdout=(tmp_path / "compare.out").open("w"),
                              stderr=(tmp_path / "compare.err").open("w"), start_new_session=True, cwd=tmp_path,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    workers: list[int] = []
    deadline = time.time() + 300  # generous: a loaded 2-core box starts spawned workers slowly
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.5)
        workers = [w for w in procs.children(parent.pid) if "spawn_main" in procs.cmdline(w)]
        if parent.poll() is not None:
            break
    err = (tmp_path / "compare.err").read_text()[-2000:]
    assert parent.poll() is None, f"compare exited with {parent.returncode} before starting its workers: {err}"
    assert len(workers) == 2, f"the pool did not start its two workers: {err}"
    # wait until both runs are training (their metrics file exists)
    while time.time() < deadline and len(list((tmp_path / "runs").glob("*/metrics.jsonl"))) < 2:
        time.sleep(0.5)
    assert len(list((tmp_path / "runs").glob("*/metrics.jsonl"))) == 2, "the two runs did not start training"
    return parent, workers


def _wait_gone(workers: list[int]) -> list[int]:
    """Wait (each worker finishes its step and checkpoints first); kill and return the workers still alive."""
    deadline = time.time() + 180
    while time.time() < deadline and any(procs.alive(w) for w in workers):
        time.sleep(0.5)
    alive = [w for w in workers if procs.alive(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    return alive


def _one_whole_checkpoint(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    saved = sorted(p.name for p in checkpoints.glob("*")) if checkpoints.is_dir() else []
    assert len(saved) == 1 and saved[0].startswith("step_"), f"{run_dir.name}: {saved} (the stop checkpoint, whole)"
    assert (checkpoints / saved[0] / "manifest.json").is_file(), f"{run_dir.name}: {saved[0]} is incomplete"


RUN_B = "  - {name: b, overrides: {model.router: topk, model.k: 2}}\n"
RUN_C = "  - {name: c, overrides: {model.router: topk, model.k: 1}}\n"
TWO_RUNS = "  - {name: a, overrides: {model.k: 2.0}}\n" + RUN_B


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("kill", ["compare", "group"])
def test_killing_compare_ends_its_workers_each_with_a_checkpoint(tmp_path, kill):
    """kill="compare": SIGKILL to the compare alone (its workers get their parent-death SIGTERM). kill="group":
    SIGTERM to its whole process group (`timeout`, a service manager, a closed session), so each worker gets
    SIGTERM twice at once, directly and as its parent-death signal: the second is the same request, not a second
    Ctrl-C that aborts the stop checkpoint (it did: the runs lost every step since their last checkpoint)."""
    parent, workers = _start_compare(tmp_path, TWO_RUNS)
    if kill == "compare":
        parent.send_signal(signal.SIGKILL)
    else:
        os.killpg(parent.pid, signal.SIGTERM)
    parent.wait()
    assert not _wait_gone(workers), "workers kept training after their compare was killed"
    for run in ("orphans-a-s0", "orphans-b-s0"):
        _one_whole_checkpoint(tmp_path / "runs" / run)


def test_ctrl_c_stops_the_study_without_starting_another_run(tmp_path):
    """Ctrl-C (SIGINT to the process group) while 2 of 3 runs train: both checkpoint and stop, the compare says
    how to continue and exits 130, and the third run never starts (it was queued behind the running two and
    started training once a worker was free)."""
    parent, workers = _start_compare(tmp_path, TWO_RUNS + RUN_C)
    os.killpg(parent.pid, signal.SIGINT)
    try:
        code = parent.wait(timeout=180)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    assert not _wait_gone(workers)
    err, out = (tmp_path / "compare.err").read_text(), (tmp_path / "compare.out").read_text()
    assert code == 130 and "interrupted; run it again to continue" in err, (code, err[-2000:])
    assert "no new run starts" in out, out[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["orphans-a-s0", "orphans-b-s0"]
    for run in ("orphans-a-s0", "orphans-b-s0"):
        _one_whole_checkpoint(tmp_path / "runs" / run)


def test_a_worker_whose_compare_is_gone_exits_without_working():
    """A compare killed before its workers' death signal was set up sends them none: a worker started or handed a
    run after its compare died must leave at once (exit 130), not train a run nobody will read."""
    def child(call: str) -> int:
        code = f"from softmoe.studies.run import _end_with_parent, _run_one_in_worker\n{call}"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode

    gone = 2**22 + 12345  # above the default pid_max: no process has it, so it is never the child's parent
    assert child(f"_end_with_parent({gone})") == 130
    assert child(f"_run_one_in_worker((None, None, False, {gone}))") == 130
    assert child(f"_end_with_parent({os.getpid()})") == 0  # its compare (here: this process) is alive


def test_a_failed_run_starts_no_other_and_its_error_is_reported(tmp_path):
    """Run a diverges (train.lr=1e10: aborted) while b trains: b finishes, c never starts, and the compare ends
    with a's error (exit 2, one line) instead of training on."""
    study = _tiny_study(tmp_path, "failing", "train.steps: 200, train.eval_every: 0",
                        "  - {name: a, overrides: {train.lr: 1.0e+10}}\n" + RUN_B + RUN_C)
    proc = subprocess.run([sys.executable, "-m", "softmoe.cli", "compare", "--config", str(study), "--jobs", "2",
                           "--quiet", "--summaries", "none"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "failing-a-s0 failed (TrainingAborted); no new run starts, waiting for 1 running run(s)" in proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "aborting at step" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "failing-b-s0" / "summary.json").is_file()  # the running run ended
    assert not (tmp_path / "runs" / "failing-c-s0").exists()
    assert not (tmp_path / "none").exists()  # `--summaries none` writes no summaries (it wrote a folder "none")
