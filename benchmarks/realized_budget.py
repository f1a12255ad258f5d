"""How closely the realized-count budget holds each layer's count at its k_l, and what the budget dial then does.

Trains a preset with `model.budget_options.realized=true` (or reuses the finished run), then prints per MoE layer
its final k_l, its realized Train AE over the last 20% of the logged steps and the difference, the mean over
layers against K, and the budget dial (`softmoe eval --budget`): the realized Infer AE and loss at each K'.
The issue's targets: |AE_l - k_l| <= 0.1 for every layer after warm-up, the mean within 0.05 of K.

Run (from the repo root; the prose presets need `softmoe data fetch --corpus prose` once):
    .venv/bin/python benchmarks/realized_budget.py --config configs/tiny/softmoe.yaml train.steps=200
    .venv/bin/python benchmarks/realized_budget.py --config configs/demo/softmoe.yaml
    .venv/bin/python benchmarks/realized_budget.py --config configs/paper8/softmoe.yaml train.steps=200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from softmoe.eval.evaluate import EvalSettings, evaluate_checkpoint
from softmoe.train.config import load_run_config
from softmoe.train.runs import train_or_reuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a preset YAML")
    parser.add_argument("--budgets", default="1,1.5,2,3", help="the dial's K' values")
    parser.add_argument("--out", default="runs/realized_budget", help="parent directory of the run")
    parser.add_argument("--max-batches", type=int, default=None, help="cap the dial's validation batches")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    args = parser.parse_args()
    name = Path(args.config).parent.name + "-realized"
    config = load_run_config(args.config, ["model.budget_options.realized=true", f"train.out_dir={args.out}",
                                           f"train.name={name}", "train.progress=false", *args.overrides])
    run_dir = train_or_reuse(config)
    summary = json.loads((run_dir / "summary.json").read_text())
    k_L, train_L = summary["k_per_layer"], summary["train_ae_per_layer"]
    budgets = tuple(float(b) for b in args.budgets.split(","))
    payload, _ = evaluate_checkpoint(run_dir, EvalSettings(splits=("val",), budgets=budgets,
                                                           max_batches=args.max_batches), report=lambda m: None)
    print(f"{args.config} {' '.join(args.overrides)}: {config.model.n_layers} layers x {config.model.num_experts} "
          f"experts, K = {config.model.k:g}, {summary['step']} steps\n")
    print("| layer | k_l (final) | realized Train AE (last 20%) | AE - k_l |\n|---|---|---|---|")
    for i, (k, ae) in enumerate(zip(k_L, train_L)):
        print(f"| {i} | {k:.3f} | {ae:.3f} | {ae - k:+.3f} |")
    mean = summary["train_ae"]
    print(f"| mean | {sum(k_L) / len(k_L):.3f} | {mean:.3f} | {mean - config.model.k:+.3f} |")
    worst = max(abs(a - k) for a, k in zip(train_L, k_L))
    print(f"\nlargest |AE_l - k_l| = {worst:.3f} (target <= 0.1); |mean AE - K| = {abs(mean - config.model.k):.3f} "
          f"(target <= 0.05)\n")
    print("| K' | realized Infer AE | per layer | val loss |\n|---|---|---|---|")
    points = payload["budget_dial"]["points"]
    for p in points:
        print(f"| {p['budget']:g} | {p['active_experts_mean']:.3f} | "
              f"{', '.join(f'{v:.2f}' for v in p['active_experts_per_layer'])} | {p['loss']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "overrides": args.overrides, "k_L": k_L,
                                               "train_ae_L": train_L, "train_ae": mean, "dial": points}, indent=1))


if __name__ == "__main__":
    main()
