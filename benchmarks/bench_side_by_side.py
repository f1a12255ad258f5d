"""Two single-thread runs side by side vs one two-thread run: which trains a study faster on 2 cores?

For a preset, alternately (round-robin, --rounds times):
    one   one training worker with train.threads=2 (bench_train.py's worker: timed optimizer steps)
    two   two workers with train.threads=1 started together (different seeds, as two study runs would be)
and reports the aggregate training throughput: tok/s of `one`, and the sum over both workers of `two`
(each worker times only its own steps, so the sum is what two runs side by side deliver while both run).
The ratio two / one is measured per round, next to each other, so background load on a shared machine
hits both alike as far as it is steady; the median over rounds is printed.

Run:
    .venv/bin/python benchmarks/bench_side_by_side.py --preset paper8/softmoe --rounds 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _worker(preset: str, steps: int, warmup: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--worker", preset, "--steps", str(steps),
           "--warmup", str(warmup), "--profile-steps", "0", "--threads", str(threads)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _tok_s(process: subprocess.Popen) -> float:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"worker failed with exit code {process.returncode}")
    return float(json.loads(out.strip().splitlines()[-1])["tok_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="a preset name, configs/<size>/<name> without .yaml")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    rows = []
    for r in range(args.rounds):
        one = _tok_s(_worker(args.preset, args.steps, args.warmup, 2))
        pair = [_worker(args.preset, args.steps, args.warmup, 1) for _ in range(2)]
        two = [_tok_s(p) for p in pair]
        rows.append({"round": r, "one_2threads_tok_s": round(one, 1), "two_1thread_tok_s": [round(t, 1) for t in two],
                     "ratio_two_over_one": round(sum(two) / one, 3)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"median ratio (two single-thread runs side by side) / (one two-thread run): "
          f"{statistics.median(row['ratio_two_over_one'] for row in rows):.3f} over {len(rows)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
