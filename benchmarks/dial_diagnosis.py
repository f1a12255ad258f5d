"""Why the budget dial moves the loss but hardly the realized active experts, under the paper's rule.

The paper's rule keeps p_i >= tau with tau = clamp(threshold * k / E, m-th largest p, largest p) and combines
with the raw p (docs/method.md). LapSum's p_i = F(r_i / alpha - b) with F(x) = e^x / 2 for x < 0: while every
p_i of a token is below 1/2, raising k only lowers b, so all p_i scale by the same factor k' / k, and so does
the threshold. The kept set of such a token cannot change with k; only its combine weights (its output scale)
do. A token's kept set can move with k only when one of its p reaches 1/2 or when the clamp's bounds bite.

This script measures that on a trained SoftMoE checkpoint: the model is run on validation batches at each
global budget K' (the learned allocation scaled, as `softmoe eval --budget` does), the router logits and k_l of
every SoftMoE layer are captured by forward hooks, and per K' it reports:

    active experts per token (the realized AE, as the dial reports it),
    kept weight: sum of the kept p per token (the scale of the layer's output),
    top-1 p, and the share of tokens whose largest p >= 1/2 (the only ones whose set can follow k),
    where tau fell: the upper clamp (keep only the top expert), the lower clamp (keep m), or in between.

With --thresholds it also reports, at the trained K on the same tokens, the active experts each relative
threshold would keep: how far the lever of the active-experts controller (`train.ae_lever=threshold`) reaches.

Run (from the repo root; CPU, about a minute per checkpoint with 8 batches):
    .venv/bin/python benchmarks/dial_diagnosis.py runs/studies/paper8/paper8-softmoe-K1.5-s0 \
        --budgets 1 1.5 2 3 --batches 8 --thresholds 0.9 1.2 1.5 1.8 --json docs/results/paper8/dial_diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from softmoe.eval.budget import check_budgets, dialed
from softmoe.eval.evaluate import load_corpus_split
from softmoe.layers import MoELayer
from softmoe.ops import soft_topk
from softmoe.routing.softk import relative_keep
from softmoe.train.checkpoint import CheckpointError
from softmoe.train.restore import load_model


def budgeted_layers(model: torch.nn.Module) -> list[MoELayer]:
    """The model's MoE layers that take a k_l from its budget, first to last."""
    return [m for m in model.modules() if isinstance(m, MoELayer) and m.uses_budget]


def capture_router_inputs(layers: list[MoELayer]) -> tuple[list, list]:
    """Forward hooks on `layers` that append (layer index, router logits [T, E], k_l) per call."""
    seen, handles = [], []
    for index, layer in enumerate(layers):
        def hook(module, args, kwargs, output, index=index):
            seen.append((index, output.router_logits.detach(), kwargs["mean_k"].detach()))
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def diagnose(logits_TE: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, threshold: float,
             cap_factor: float) -> dict[str, torch.Tensor]:
    """Per-token quantities of the paper's rule at k: kept count, kept mass, top-1 p, and tau's regime."""
    num_experts = logits_TE.shape[-1]
    p_TE = soft_topk(logits_TE, k, alpha)
    keep_TE = relative_keep(p_TE, k, threshold, cap_factor)
    p_desc = p_TE.sort(dim=-1, descending=True).values
    m = min(math.ceil(float(k) * cap_factor), num_experts)
    base = threshold * float(k) / num_experts
    return {
        "active": keep_TE.sum(-1).float(),
        "kept_weight": (p_TE * keep_TE).sum(-1),
        "top1_p": p_desc[:, 0],
        "top1_at_least_half": (p_desc[:, 0] >= 0.5).float(),
        "tau_upper_clamp": (base > p_desc[:, 0]).float(),
        "tau_lower_clamp": (base < p_desc[:, m - 1]).float(),
    }


def run(checkpoint: Path, budgets: list[float], batches: int, thresholds: list[float] = ()) -> dict:
    model, config, path = load_model(checkpoint, report=lambda message: None)
    check_budgets(model, budgets)  # a SoftMoE model with a budget, every K' in its bounds
    layers = budgeted_layers(model)
    cfg = layers[0].router.config
    if cfg.truncation != "relative":
        raise ValueError(f"checkpoint={str(checkpoint)!r}: truncation={cfg.truncation!r}; this diagnoses the paper's "
                         "relative rule")
    data = load_corpus_split(config, path, config.data.corpus, "val")
    seq_len, batch_size = config.data.seq_len, config.data.batch_size
    usable = (data.tokens.shape[0] - 1) // seq_len
    rows = min(usable, batches * batch_size)
    idx = torch.from_numpy(data.tokens[:rows * seq_len].astype("int64")).view(rows, seq_len)
    seen, handles = capture_router_inputs(layers)
    threshold = float(layers[0].router.threshold)  # the routers' own (a controller may have moved it)
    points, sweep = [], []
    try:
        for budget in budgets:
            seen.clear()
            with dialed(model, budget) as k_L, torch.no_grad():
                for start in range(0, rows, batch_size):
                    model(idx[start:start + batch_size])
            per_layer: dict[int, dict[str, list]] = {}
            for layer, logits_TE, k in seen:
                alpha = layers[layer].router.alpha.detach()
                for name, values in diagnose(logits_TE, k, alpha, threshold, cfg.cap_factor).items():
                    per_layer.setdefault(layer, {}).setdefault(name, []).append(values)
            layer_means = {layer: {name: float(torch.cat(v).mean()) for name, v in stats.items()}
                           for layer, stats in sorted(per_layer.items())}
            names = next(iter(layer_means.values())).keys()
            points.append({
                "budget": budget, "k_L": [round(float(v), 4) for v in k_L],
                "mean_over_layers": {n: sum(m[n] for m in layer_means.values()) / len(layer_means) for n in names},
                "per_layer": {str(layer): stats for layer, stats in layer_means.items()},
            })
        if thresholds:  # the trained K, the same tokens, each threshold applied to the captured logits
            seen.clear()
            with torch.no_grad():
                for start in range(0, rows, batch_size):
                    model(idx[start:start + batch_size])
            for candidate in thresholds:
                active: dict[int, list[torch.Tensor]] = {}
                for layer, logits_TE, k in seen:
                    alpha = layers[layer].router.alpha.detach()
                    active.setdefault(layer, []).append(diagnose(logits_TE, k, alpha, candidate,
                                                                 cfg.cap_factor)["active"])
                per_layer = [float(torch.cat(v).mean()) for _, v in sorted(active.items())]
                sweep.append({"threshold": candidate, "active": sum(per_layer) / len(per_layer),
                              "per_layer": per_layer})
    finally:
        for handle in handles:
            handle.remove()
    return {"checkpoint": str(path), "tokens_per_budget": rows * seq_len, "threshold": threshold,
            "cap_factor": cfg.cap_factor, "num_experts": cfg.num_experts, "points": points,
            "threshold_sweep": sweep}


def markdown(result: dict) -> str:
    lines = [f"Checkpoint `{result['checkpoint']}`, {result['tokens_per_budget']:,} validation tokens per K', "
             f"E = {result['num_experts']}, threshold {result['threshold']}, c = {result['cap_factor']}; means over "
             "tokens and layers.", "",
             "| K' | active experts | kept weight (sum of kept p) | top-1 p | tokens with top-1 p >= 1/2 | "
             "tau at upper clamp (keep 1) | tau at lower clamp (keep m) |", "|---|---|---|---|---|---|---|"]
    for point in result["points"]:
        m = point["mean_over_layers"]
        lines.append(f"| {point['budget']:g} | {m['active']:.3f} | {m['kept_weight']:.3f} | {m['top1_p']:.3f} | "
                     f"{m['top1_at_least_half']:.3f} | {m['tau_upper_clamp']:.3f} | {m['tau_lower_clamp']:.3f} |")
    if result.get("threshold_sweep"):
        lines += ["", "At the trained K, the same tokens: the threshold the rule compares p_i / (k_l / E) with.", "",
                  "| threshold | active experts | per layer, first to last |", "|---|---|---|"]
        for point in result["threshold_sweep"]:
            layers = ", ".join(f"{a:.2f}" for a in point["per_layer"])
            lines.append(f"| {point['threshold']:g} | {point['active']:.3f} | {layers} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a SoftMoE run directory or checkpoint")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="global budgets K'")
    parser.add_argument("--batches", type=int, default=8, help="validation batches per K' (default 8)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="also the active experts at the trained K for each of these relative thresholds "
                             "(the lever of train.ae_lever=threshold)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.batches < 1:
        print(f"dial_diagnosis: --batches={args.batches} must be >= 1", file=sys.stderr)
        return 2
    bad = [t for t in args.thresholds if not (math.isfinite(t) and t >= 0)]
    if bad:
        print(f"dial_diagnosis: --thresholds {bad[0]} must be a finite number >= 0", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    try:
        result = run(args.checkpoint, args.budgets, args.batches, args.thresholds)
    except (CheckpointError, ValueError) as err:  # not a checkpoint, not SoftMoE, not the paper's rule, no data
        print(f"dial_diagnosis: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
