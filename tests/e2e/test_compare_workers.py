"""A killed `softmoe compare --jobs 2` leaves no worker training on: the pool's workers end with their parent
(Linux: PR_SET_PDEATHSIG), each checkpointing its run, so the next compare resumes instead of racing an orphan.

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

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_compare_ends_its_workers(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(f"""name: orphans
base: {CONFIGS / 'tiny' / 'softmoe.yaml'}
out_dir: {tmp_path / 'runs'}
seeds: [0]
overrides: {{train.steps: 100000, train.progress: false, train.tensorboard: false, train.ckpt_every: 0,
            data.data_dir: {tmp_path / 'data'}}}
variants:
  - {{name: a, overrides: {{model.k: 2.0}}}}
  - {{name: b, overrides: {{model.router: topk, model.k: 2}}}}
""")
    parent = subprocess.Popen([sys.executable, "-m", "softmoe.cli", "compare", "--config", str(study), "--jobs", "2",
                               "--quiet", "--summaries", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.time() + 300  # generous: a loaded 2-core box starts spawned workers slowly
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.5)
        workers = [w for w in _children(parent.pid) if "spawn_main" in
                   subprocess.run(["ps", "-o", "args=", "-p", str(w)], capture_output=True, text=True).stdout]
    assert len(workers) == 2, "the pool did not start its two workers"
    # wait until both runs are training (their metrics file exists)
    while time.time() < deadline and len(list((tmp_path / "runs").glob("*/metrics.jsonl"))) < 2:
        time.sleep(0.5)
    assert len(list((tmp_path / "runs").glob("*/metrics.jsonl"))) == 2, "the two runs did not start training"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 180  # each worker finishes its step and checkpoints first
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.5)
    alive = [w for w in workers if _alive(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "workers kept training after their compare was killed"
