"""The launch command of the docs, for real: torchrun starts 2 processes of `python -m softmoe.train`.

Then the sharded checkpoint converts to a single-file one that `softmoe generate` reads; a launch killed
(SIGKILL to torchrun and every worker) after a checkpoint resumes with `--resume` to bitwise the
uninterrupted run; a distributed config outside torchrun is a one-line error with exit code 2.

Run: .venv/bin/python -m pytest -q tests/e2e/test_distributed_cli.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softmoe.cli import main
from softmoe.parallel.checkpoint import is_sharded
from softmoe.parallel.checkpoint import main as convert_main
from softmoe.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from softmoe.train.metrics import read_metrics
from tests.e2e import procs
from tests.unit.parallel.spawn import run_ranks

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny" / "softmoe.yaml"


def _overrides(root: Path, *args: str) -> list[str]:
    return [f"train.out_dir={root / 'runs'}", f"data.data_dir={root / 'data'}", "train.eval_every=0",
            "train.eval_batches=1", "train.progress=false", "train.tensorboard=false", *args]


def _torchrun(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "softmoe.train",
            "--config", str(TINY), *_overrides(tmp_path, *args)]


def _env() -> dict[str, str]:
    # PYTHONPATH: the workers import this checkout's softmoe (not whichever one the venv has installed)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _launch(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `_torchrun(tmp_path, *args)` to its end. A launch past `timeout` fails the test with every worker's
    Python stacks (SIGABRT, which faulthandler turns into a dump on stderr), and no process of it outlives the
    test: subprocess.run's own timeout kills torchrun alone and leaves its workers running."""
    proc = subprocess.Popen(_torchrun(tmp_path, *args), cwd=tmp_path, env={**_env(), "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = procs.descendants(proc.pid)  # once, before any signal: the children of an aborted worker are re-parented
        workers = [pid for pid in tree if "softmoe.train" in procs.cmdline(pid)]
        for pid in [proc.pid, *workers]:  # frozen: neither torchrun nor a peer reacts to the first abort
            procs.send(pid, signal.SIGSTOP)
        for pid in workers:  # one at a time, so that their dumps on the shared stderr do not interleave
            procs.send(pid, signal.SIGABRT)
            procs.send(pid, signal.SIGCONT)
            time.sleep(1.5)
        for pid in [*tree, proc.pid]:
            procs.send(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        dumps = err[max(err.find("Fatal Python error"), 0):]
        pytest.fail(f"torchrun {' '.join(args)} still ran after {timeout}s; {len(workers)} workers' stacks "
                    f"(stdout: {out[-500:]!r}):\n{dumps[:12000]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def uninterrupted(rank: int, size: int, root: str, args: list[str]) -> None:
    """One rank of the run `softmoe train --config TINY <overrides>` is under torchrun, never stopped."""
    from softmoe.parallel.trainer import DistributedTrainer
    from softmoe.parallel.world import init_world
    from softmoe.train.config import load_run_config

    config = load_run_config(TINY, _overrides(Path(root), *args))
    DistributedTrainer(config, init_world(config.parallel), report=lambda _message: None).fit()


def test_torchrun_ddp_trains_and_converts(tmp_path, capsys):
    proc = _launch(tmp_path, "parallel.data=ddp", "train.steps=4", "train.log_every=2", "train.ckpt_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done at step 4") == 1, proc.stdout  # rank 0 alone reports
    assert "find_unused_parameters" not in proc.stderr, proc.stderr  # DDP's C++ warning, on every rank before
    run_dir = tmp_path / "runs" / "tiny-softmoe"
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 4
    checkpoint = run_dir / "checkpoints" / "step_0000004"
    assert is_sharded(checkpoint)

    assert convert_main([str(run_dir), str(tmp_path / "single")]) == 0
    code = main(["generate", "--checkpoint", str(tmp_path / "single"), "--prompt", "Four score",
                 "--max-new-tokens", "4", "--temperature", "0"])
    assert code == 0
    assert "Four score" in capsys.readouterr().out

    # The same launch again: the run directory holds this run. torchrun fails; the reason is said once, in the
    # summary that ends torchrun's output (issue 27: one line buried above ~40 lines of ChildFailedError).
    again = _launch(tmp_path, "parallel.data=ddp", "train.steps=4", "train.log_every=2", "train.ckpt_every=0")
    assert again.returncode != 0
    output = again.stdout + again.stderr
    assert output.count("softmoe train: ") == 1, output
    tail = again.stderr[again.stderr.index("Root Cause"):]
    assert "softmoe train: " in tail and "already holds this run" in tail and "--resume" in tail, tail
    assert tail.rstrip().endswith("=" * 10), tail  # nothing of ours after torchrun's summary


def test_killed_launch_resumes_exactly(tmp_path):
    """SIGKILL torchrun and its workers after the step-40 checkpoint; --resume finishes the run, and its
    weights equal bitwise those of the same run never interrupted (forked ranks: same code, same world)."""
    from softmoe.parallel.checkpoint import to_single_file

    args = ["parallel.data=ddp", "train.steps=160", "train.ckpt_every=40", "train.log_every=10", "train.keep_last=5"]
    proc = subprocess.Popen(_torchrun(tmp_path, *args), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "runs" / "tiny-softmoe" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step_0000040").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = procs.descendants(proc.pid)
    for pid in [*workers, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not any("softmoe" in procs.cmdline(pid) for pid in workers), "a worker survived the kill"
    assert not (checkpoints / "step_0000160").exists(), "the run finished before it could be killed"
    resumed = _launch(tmp_path, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_0000160" not in resumed.stdout.split("resumed from")[1][:200]
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "tiny-softmoe", "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 160  # no duplicate records after the resume

    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "data").symlink_to(tmp_path / "data")
    run_ranks(uninterrupted, 2, str(reference), args)
    want = load_checkpoint(to_single_file(reference / "runs" / "tiny-softmoe", tmp_path / "want"))[0]
    got = load_checkpoint(to_single_file(tmp_path / "runs" / "tiny-softmoe", tmp_path / "got"))[0]
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name}: the resumed run differs from the uninterrupted one"


def test_distributed_config_without_torchrun_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code = main(["train", "--config", str(TINY), "parallel.data=ddp", f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "needs a torchrun launch" in err


def test_single_file_readers_explain_a_sharded_checkpoint(tmp_path):
    """`softmoe eval/generate/export` on a sharded checkpoint: a CheckpointError saying how to convert it."""
    path = save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {}, {"step": 1})
    (path / "model.safetensors").rename(path / ".metadata")  # the layout of a sharded checkpoint
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][".metadata"] = manifest["files"].pop("model.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="a sharded checkpoint of a multi-process run; .* convert it"):
        load_checkpoint(path)
