"""Short calibration runs for a study preset: loss spikes under two schedules, and how far the learned k_l
move at several budget learning-rate multipliers. Prints the measurements; nothing is typed in.

Each named case is `softmoe train <preset>` with its overrides, cut to --steps steps, logged every step
(train) into <out>/<case>; --jobs cases run at once with one thread each. Already finished cases are
reused (rerun to add cases). Then, per case:

    spike     the largest rise of the per-step train loss between two consecutive steps after step 5,
              and its step (a spike is a rise of 0.3+ nats, the size issue 18 counted in the old study)
    loss      mean train loss over the last 10 steps
    k_l       the learned per-layer k_l at the last step, their spread (max - min), and their drift over
              the last third of the steps (mean |k_l(end) - k_l(2/3)|: near 0 = settled)
    AE        realized Train AE over the last 10 steps (and the budget K = mean k_l)

Run (the measurements in docs/results.md "Study in progress"):
    .venv/bin/python benchmarks/study_calibration.py --preset configs/paper8/softmoe.yaml --steps 150 --jobs 2 \
        --case old-k2:model.router=topk,model.k=2,train.lr=3e-3,train.warmup_steps=12 \
        --case new-k2:model.router=topk,model.k=2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") == "train" and isinstance(record.get("loss"), (int, float)):
            out.append(record)
    return out


def analyse(run_dir: Path) -> dict:
    """The measurements of one finished case (see the module docstring)."""
    rows = _records(run_dir)
    if len(rows) < 12:
        return {"case": run_dir.name, "error": f"only {len(rows)} train records"}
    rises = [(b["loss"] - a["loss"], b["step"]) for a, b in zip(rows, rows[1:]) if a["step"] >= 5]
    rise, at = max(rises)
    out = {"case": run_dir.name, "steps": rows[-1]["step"], "max_rise": round(rise, 3), "at_step": at,
           "spikes_0.3": sum(r >= 0.3 for r, _ in rises),
           "loss_last10": round(sum(r["loss"] for r in rows[-10:]) / 10, 4)}
    ae = [r.get("active_experts_mean") for r in rows[-10:] if r.get("active_experts_mean") is not None]
    if ae:
        out["train_ae_last10"] = round(sum(ae) / len(ae), 3)
    if rows[-1].get("layers") and "k" in rows[-1]["layers"][0]:
        k_end = [layer["k"] for layer in rows[-1]["layers"]]
        k_mid = [layer["k"] for layer in rows[(2 * len(rows)) // 3]["layers"]]
        out.update(k_L=[round(k, 3) for k in k_end], k_spread=round(max(k_end) - min(k_end), 3),
                   K=round(sum(k_end) / len(k_end), 3),
                   k_drift_last_third=round(sum(abs(a - b) for a, b in zip(k_end, k_mid)) / len(k_end), 4))
    return out


def run_case(preset: str, out: Path, name: str, overrides: list[str], steps: int, threads: int,
             schedule_steps: int | None = None) -> Path:
    run_dir = out / name
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("step") == steps:
        return run_dir
    cmd = [sys.executable, "-m", "softmoe.cli", "train", "--config", preset, "--quiet", "--out", str(out),
           f"train.name={name}", f"train.steps={schedule_steps or steps}", "train.log_every=1", "train.eval_every=0",
           "train.ckpt_every=0", "train.tensorboard=false", f"train.threads={threads}", *overrides]
    if schedule_steps:
        cmd += ["--stop-after", str(steps)]
    if run_dir.exists():
        cmd.append("--overwrite")
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--steps", type=int, required=True, help="training steps per case (also train.steps "
                        "unless --schedule-steps: the schedule is then the one of a run this long)")
    parser.add_argument("--schedule-steps", type=int, default=None,
                        help="train.steps of the schedule (cosine length); the run stops after --steps")
    parser.add_argument("--case", action="append", default=[], metavar="NAME:key=value,...")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "runs" / "calibration"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for spec in args.case:
        name, _, rest = spec.partition(":")
        cases.append((name, [item for item in rest.split(",") if item]))
    threads = 1  # one thread per case: on the shared 2-core box faster than two (benchmarks/bench_side_by_side.py)
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(lambda c: run_case(args.preset, out, c[0], c[1], args.steps, threads,
                                                args.schedule_steps), cases))
    for run_dir in dirs:
        print(json.dumps(analyse(run_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
