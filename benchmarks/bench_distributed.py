"""Distributed training on this box: step time and tokens/s of 1 vs 2 processes, and the share of a
step spent in communication.

Every candidate trains the same model on the same global batch (so the same work per step):
    1proc_1thread   one process, 1 intra-op thread
    1proc_2threads  one process, 2 threads: the 2-process runs' core budget
    ddp             torchrun, 2 processes x 1 thread, parallel.data=ddp
    fsdp            2 processes, parallel.data=fsdp (FSDP2 per block)
    ep2_ddp         2 processes, parallel.data=ddp parallel.expert=2 (each rank holds half the experts)
Each candidate is a fresh launch (`torchrun` for 2 processes) that times `--steps` optimizer steps after
`--warmup`; the candidates are launched round-robin `--rounds` times, so background load on this
shared box spreads over all of them, and the table reports medians over all timed steps.
Communication share: the summed duration of the gloo collectives (torch.profiler's `gloo:*` events,
waits for the other rank included) over the wall time of a few profiled steps on rank 0. DDP overlaps
its gradient all-reduce with the backward, so the share bounds, rather than equals, what
communication adds to a step.

What a 2-core box can show: that the distributed paths run and what they cost here (launch, all-reduce,
all-to-all on shared memory through gloo, and 2 processes contending for 2 cores with other jobs).
What it cannot show: speedup from more hardware. The 2 processes share the cores one process with 2
threads would use, so 2 processes at best match `1proc_2threads`; expert parallelism's memory saving
(half the experts per rank) and NCCL/GPU scaling need real devices.

Run:
    .venv/bin/python benchmarks/bench_distributed.py                # table
    .venv/bin/python benchmarks/bench_distributed.py --json         # also writes benchmarks/results/bench_distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = REPO / "configs" / "tiny" / "softmoe.yaml"
# A model large enough that a step is mostly compute (d 128, 4 layers, E 8), on the offline fixture corpus.
MODEL = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.num_experts=8", "model.d_expert=128",
         "model.d_ff=256", "model.max_seq_len=64", "data.seq_len=64", "data.batch_size=16"]
CANDIDATES = {
    "1proc_1thread": (1, ["train.threads=1"]),
    "1proc_2threads": (1, ["train.threads=2"]),
    "ddp": (2, ["train.threads=1", "parallel.data=ddp"]),
    "fsdp": (2, ["train.threads=1", "parallel.data=fsdp"]),
    "ep2_ddp": (2, ["train.threads=1", "parallel.data=ddp", "parallel.expert=2"]),
}


def _config(data_dir: str, overrides: list[str]):
    from softmoe.train.config import load_run_config

    return load_run_config(TINY, [f"data.data_dir={data_dir}", "train.out_dir=" + tempfile.mkdtemp(),
                                  "train.progress=false", "train.tensorboard=false", *MODEL, *overrides])


def _comm_seconds(prof) -> float:
    return sum(e.cpu_time_total for e in prof.events() if e.name.startswith(("gloo:", "nccl:"))) / 1e6


def worker(name: str, data_dir: str, warmup: int, steps: int, profiled: int, out: str) -> None:
    """One launch of candidate `name`: time `steps` steps, then profile `profiled` more (rank 0 writes)."""
    import torch

    from softmoe.parallel.launch import build_trainer, finish

    trainer = build_trainer(_config(data_dir, CANDIDATES[name][1]))
    for step in range(warmup):
        trainer.train_step(step)
    times = []
    for step in range(warmup, warmup + steps):
        tic = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - tic)
    comm_share = None
    if trainer.config.parallel.distributed:
        from torch.profiler import profile

        tic = time.perf_counter()
        with profile() as prof:
            for step in range(warmup + steps, warmup + steps + profiled):
                trainer.train_step(step)
        comm_share = _comm_seconds(prof) / (time.perf_counter() - tic)
    if trainer.writes_run_files:
        tokens = trainer.data.tokens_per_batch * trainer.config.train.grad_accum
        Path(out).write_text(json.dumps({"times": times, "comm_share": comm_share, "tokens_per_step": tokens,
                                         "torch_threads": torch.get_num_threads()}))
    finish(trainer)


def launch(name: str, data_dir: str, args) -> dict:
    procs, _ = CANDIDATES[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker_args = [str(Path(__file__).resolve()), "--worker", name, "--data-dir", data_dir, "--warmup",
                       str(args.warmup), "--steps", str(args.steps), "--profiled", str(args.profiled), "--out", str(out)]
        launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={procs}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([*launcher, *worker_args], env=env, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="round-robin launches of every candidate")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per launch")
    parser.add_argument("--profiled", type=int, default=3, help="profiled steps per launch (communication share)")
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/bench_distributed.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data_dir, args.warmup, args.steps, args.profiled, args.out)
        return 0

    from softmoe.data.prepare import dataset_dir_for

    data_dir = tempfile.mkdtemp()
    dataset_dir_for(_config(data_dir, []).data)  # build the fixture corpus once, before any launch
    results = {name: {"times": [], "comm": []} for name in CANDIDATES}
    tokens = None
    for _ in range(args.rounds):
        for name in CANDIDATES:
            r = launch(name, data_dir, args)
            results[name]["times"] += r["times"]
            if r["comm_share"] is not None:
                results[name]["comm"].append(r["comm_share"])
            tokens = r["tokens_per_step"]
    one = statistics.median(results["1proc_1thread"]["times"])
    two = statistics.median(results["1proc_2threads"]["times"])
    rows = []
    print(f"{tokens} tokens per optimizer step, {args.rounds} launches x {args.steps} timed steps per candidate")
    print(f"{'candidate':<16}{'step ms':>10}{'tok/s':>10}{'speedup vs 1 proc 1 thread':>28}"
          f"{'vs 1 proc 2 threads':>21}{'comm share':>12}")
    for name, r in results.items():
        step = statistics.median(r["times"])
        comm = statistics.median(r["comm"]) if r["comm"] else None
        q1, _, q3 = statistics.quantiles(r["times"], n=4)
        rows.append({"candidate": name, "processes": CANDIDATES[name][0], "step_s_median": step, "step_s_q1": q1,
                     "step_s_q3": q3, "tokens_per_s": tokens / step, "speedup_vs_1proc_1thread": one / step,
                     "speedup_vs_1proc_2threads": two / step, "comm_share": comm})
        comm_text = f"{comm:.0%}" if comm is not None else "-"
        print(f"{name:<16}{step * 1e3:>10.1f}{tokens / step:>10.0f}{one / step:>27.2f}x{two / step:>20.2f}x"
              f"{comm_text:>12}")
    if args.json:
        from benchmarks.timing import write_json

        path = write_json("bench_distributed", rows, {"tokens_per_step": tokens, "rounds": args.rounds,
                                                      "steps": args.steps, "model_overrides": MODEL})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
