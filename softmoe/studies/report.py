"""The comparison report: markdown with PNG plots, written from run directories and their evaluations.

Inputs per run: `<run_dir>/metrics.jsonl` (training curves, per-layer k over training),
`<run_dir>/summary.json` (throughput) and a `SplitEval` of the final model (loss, histogram of
active experts). Everything in the report is read from those files; nothing is typed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from softmoe.eval.perplexity import SplitEval
from softmoe.common.extras import MissingExtra
from softmoe.eval.plots import pyplot, save_figure, style_axes
from softmoe.routing import router_class
from softmoe.train.metrics import read_metrics

__all__ = ["RunResult", "compute_title", "k_range", "write_report"]


@dataclass
class RunResult:
    """One trained variant of a comparison."""

    label: str  # e.g. "softmoe (K=2)"
    run_dir: Path
    final: SplitEval  # evaluation of the final checkpoint
    split: str = "val"

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_losses(runs: list[RunResult], path: Path) -> Path:
    """Training loss (thin) and validation loss (markers) of every run against the step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        color = f"C{i}"
        steps, loss = _series(read_metrics(run.run_dir, "train"), "loss")
        ax.plot(steps, loss, color=color, alpha=0.55, lw=1, label=f"{run.label} train")
        steps, loss = _series(read_metrics(run.run_dir, "val"), "loss")
        ax.plot(steps, loss, color=color, marker="o", lw=2, label=f"{run.label} val")
    style_axes(ax, "optimizer step", "cross-entropy (nats / token)", "Training and validation loss")
    return save_figure(fig, path)


def plot_layer_k(run: RunResult, path: Path) -> Path:
    """Per-layer k_l (the soft top-k mass, solid) and realized Train AE (dashed) of a SoftMoE run over training."""
    plt = pyplot()
    records = [r for r in read_metrics(run.run_dir, "train") if r.get("layers")]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [r["step"] for r in records]
    values = []
    for j, layer in enumerate(records[0]["layers"] if records else []):
        k_l = [r["layers"][j]["k"] for r in records]
        ae_l = [r["layers"][j].get("active_experts_mean", np.nan) for r in records]
        line, = ax.plot(steps, k_l, label=f"block {layer['block']}: k_l")
        ax.plot(steps, ae_l, color=line.get_color(), ls="--", lw=1, label=f"block {layer['block']}: AE")
        values += k_l + [v for v in ae_l if np.isfinite(v)]
    if records:
        mean_k = [np.mean([layer["k"] for layer in r["layers"]]) for r in records]
        ax.plot(steps, mean_k, color="black", ls=":", lw=1, label="mean k_l (budget K)")
        ax.set_ylim(*k_range(values, float(np.mean(mean_k))))
    style_axes(ax, "optimizer step", "experts per token", f"k_l (soft mass, solid) and realized Train AE "
               f"(dashed): {run.label}", legend_size=7, legend_outside=True)
    return save_figure(fig, path)


def plot_logit_spread(runs: list[RunResult], path: Path) -> Path:
    """The router logit spread (mean over tokens of the std over experts) of every MoE layer over training."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        records = [r for r in read_metrics(run.run_dir, "train") if r.get("layers")]
        if not records or "logit_spread" not in records[0]["layers"][0]:
            continue
        steps = [r["step"] for r in records]
        for j, layer in enumerate(records[0]["layers"]):
            ax.plot(steps, [r["layers"][j].get("logit_spread", np.nan) for r in records], color=f"C{j}",
                    ls=styles[i % len(styles)], lw=1.2, label=f"{run.label}, block {layer['block']}")
    style_axes(ax, "optimizer step", "router logit spread (std over experts)",
               "Router logit spread by layer (it sets the count under the paper's rule)", legend_size=7,
               legend_outside=True)
    return save_figure(fig, path)


def plot_load_heatmap(runs: list[RunResult], path: Path) -> Path:
    """Per run, a heat map of each MoE layer's expert load on the scored split, relative to uniform (1 = E^-1)."""
    plt = pyplot()
    moe = [run for run in runs if run.final.layers]
    fig, axes = plt.subplots(1, len(moe), figsize=(4.5 * len(moe), 0.5 * max(len(r.final.layers) for r in moe) + 1.8),
                             squeeze=False)
    for ax, run in zip(axes[0], moe):
        load = np.stack([layer.expert_load * layer.expert_load.shape[0] for layer in run.final.layers])
        image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(load.max())))
        ax.set_yticks(range(load.shape[0]), [f"block {layer.block}" for layer in run.final.layers])
        ax.set_xlabel("expert")
        ax.set_title(run.label, fontsize=9)
        fig.colorbar(image, ax=ax, label="load / uniform")
    fig.suptitle(f"Expert load by layer ({runs[0].split} split; < 0.1 counts as dead)", fontsize=10)
    return save_figure(fig, path)


def k_range(values: list[float], budget: float, half_span: float = 0.5) -> tuple[float, float]:
    """y-limits for per-layer k_l: the data, but never narrower than budget ± half_span, so allocations
    that barely moved (1.97 to 2.03) look flat instead of filling the axes."""
    low, high = min([*values, budget - half_span]), max([*values, budget + half_span])
    pad = 0.05 * (high - low)
    return max(0.0, low - pad), high + pad


def plot_active_histogram(runs: list[RunResult], path: Path) -> Path:
    """Fraction of tokens by number of active experts, summed over MoE layers, per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        hist = sum(layer.active_hist for layer in run.final.layers)
        frac = hist / max(hist.sum(), 1)
        x = np.arange(frac.shape[0]) + (i - (len(runs) - 1) / 2) * width
        ax.bar(x, frac, width=width, label=f"{run.label} (mean {run.final.active_experts_mean:.2f})")
    style_axes(
        ax,
        "active experts per token",
        f"fraction of (token, layer) pairs, {runs[0].split if runs else ''} split",
        "Active experts per token",
        grid_axis="y",
    )
    return save_figure(fig, path)


def results_table(runs: list[RunResult]) -> str:
    """Markdown table: final loss, perplexity, Train / Infer AE, throughput, parameters."""
    lines = [
        "| run | final val loss | val perplexity | Train AE | Infer AE | per-layer Infer AE | nominal k at the end "
        "| logit spread | load max/mean | dead experts | train tok/s | parameters |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run.summary
        layers = run.final.layers
        per_layer = ", ".join(f"{layer.active_mean:.2f}" for layer in layers) or "-"
        k_l = ", ".join(f"{layer.k:.2f}" for layer in layers) or "-"
        spread = ", ".join(f"{layer.logit_spread:.2f}" for layer in layers) or "-"
        peak = ", ".join(f"{layer.load_diagnostics['load_max_over_mean']:.2f}" for layer in layers) or "-"
        dead = ", ".join(f"{layer.load_diagnostics['dead_fraction']:.2f}" for layer in layers) or "-"
        active, train = run.final.active_experts_mean, s.get("train_ae")
        lines.append(
            f"| {run.label} | {run.final.loss:.4f} | {run.final.perplexity:.1f} | "
            f"{'-' if train is None else f'{train:.2f}'} | {'-' if active is None else f'{active:.2f}'} | "
            f"{per_layer} | {k_l} | {spread} | {peak} | {dead} | {s.get('tokens_per_sec') or 0:,.0f} | "
            f"{s.get('num_params', 0):,} |"
        )
    lines += ["", "AE (active experts, the paper's name): realized routed experts per token, averaged over MoE "
              "layers; Train AE in training mode over the last 20% of logged steps, Infer AE in eval mode on the "
              "scored split. Nominal k: top-k's k, or SoftMoE's k_l, the soft top-k mass (not a count). Logit "
              "spread: mean over tokens of the std over experts of the router logits; load max/mean and dead "
              "experts (load below 10% of uniform) on the scored split; one value per MoE layer."]
    return "\n".join(lines)


def observations(runs: list[RunResult]) -> list[str]:
    """Plain statements computed from the results: each run against the first one (loss, expert compute)."""
    if len(runs) < 2:
        return []
    base = runs[0]
    lines = []
    for run in runs[1:]:
        diff = run.final.loss - base.final.loss
        lines.append(f"- {base.label}: final validation loss {base.final.loss:.4f} vs {run.label} {run.final.loss:.4f} "
                     f"({'lower' if diff > 0 else 'higher'} by {abs(diff):.4f} nats/token, one seed each).")
        a, b = base.final.active_experts_mean, run.final.active_experts_mean
        if a is not None and b:
            lines.append(f"- Realized active experts per token: {a:.2f} vs {b:.2f}, so {base.label} ran "
                         f"{a / b:.2f}x the expert FLOPs per token of {run.label}.")
    k_values = [layer.k for layer in base.final.layers]
    if k_values and _has_learned_k(base):
        lines.append(f"- Learned per-layer k_l of {base.label}: {min(k_values):.2f} to {max(k_values):.2f} "
                     f"(mean {sum(k_values) / len(k_values):.2f}, the global budget).")
    return lines + [line for run in runs if (line := budget_meaning(run))]


def budget_meaning(run: RunResult) -> str | None:
    """What the run's budget K held, in one sentence with the measured numbers (None without a budget).

    Under the paper's rule K sets the soft top-k mass and the threshold (with the logit spread and E) sets the
    count; with `budget_options.realized` the thresholds are steered so the count follows k_l."""
    if not _has_learned_k(run) or not run.final.layers:
        return None
    model = yaml.safe_load((run.run_dir / "config.yaml").read_text())["model"]
    budget = float(model["k"])
    train, infer = run.summary.get("train_ae"), run.final.active_experts_mean
    spread = np.mean([layer.logit_spread for layer in run.final.layers])
    measured = (f"realized Train AE {train:.2f}, Infer AE {infer:.2f}" if train is not None
                else f"realized Infer AE {infer:.2f}")
    if (model.get("budget_options") or {}).get("realized") is True:
        return (f"- {run.label}: K = {budget:g} is held in realized counts (`budget_options.realized`): each "
                f"layer's threshold is steered so its count follows k_l; {measured}.")
    return (f"- {run.label}: under the paper's rule K = {budget:g} sets the soft top-k mass (sum of p per token), "
            f"not the count: {measured}. The threshold, the router logit spread ({spread:.2f} here) and E set the "
            f"count (docs/routers.md, \"Nominal k and realized count\"); `model.budget_options.realized=true` "
            f"holds the budget in realized counts.")


def compute_title(runs: list[RunResult]) -> str:
    """What the compared runs spent, in their order: realized mean active experts per token and the ratio
    of the first run's expert FLOPs to the others', e.g. "2.86 vs 2.00 active experts per token (1.43x)"."""
    active = [run.final.active_experts_mean for run in runs]
    if len(active) < 2 or not all(active):
        return ""
    ratios = ", ".join(f"{active[0] / value:.2f}x" for value in active[1:])
    return f"{' vs '.join(f'{value:.2f}' for value in active)} active experts per token ({ratios} the expert FLOPs)"


def write_report(runs: list[RunResult], out_dir: Path, title: str, context: list[str]) -> Path:
    """Write `<out_dir>/report.md` and its plots; returns the report's path.

    Args:
        runs: the variants to compare; SoftMoE runs (with per-layer k) get an allocation plot each.
        out_dir: the report folder.
        title: the report's heading.
        context: markdown lines placed under the heading (data, commands, hardware, token counts).
    """
    out_dir = Path(out_dir)
    try:
        plots, missing = _plots(runs, out_dir), []
    except MissingExtra as err:  # a core-only install: the report without its plots, and how to get them
        plots, missing = [], [f"No plots: {err}; then run the same command again (finished runs are reused).", ""]
        print(f"writing the report without plots: {err}", flush=True)
    body = [f"# {title}", "", *context, "", "## Results", "", results_table(runs), "", *observations(runs), "",
            *missing]
    for caption, path in plots:
        body += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    report = out_dir / "report.md"
    tmp = report.with_name("report.md.tmp")
    tmp.write_text("\n".join(body))
    tmp.replace(report)
    return report


def _plots(runs: list[RunResult], out_dir: Path) -> list[tuple[str, Path]]:
    """(caption, path) of every plot of the report, drawn; MissingExtra without matplotlib."""
    plots = [("Loss curves", plot_losses(runs, out_dir / "loss.png"))]
    for i, run in enumerate(runs):
        if _has_learned_k(run):
            plots.append((f"Per-layer k_l (soft mass) and realized AE: {run.label}",
                          plot_layer_k(run, out_dir / f"layer_k_{i}.png")))
    if any(run.final.layers for run in runs):
        plots.append(("Active experts per token", plot_active_histogram(runs, out_dir / "active_experts.png")))
        plots.append(("Router logit spread", plot_logit_spread(runs, out_dir / "logit_spread.png")))
        plots.append(("Expert load by layer", plot_load_heatmap(runs, out_dir / "expert_load.png")))
    return plots


def _has_learned_k(run: RunResult) -> bool:
    """Whether the run's config routes with a budget (SoftMoE): its k_l can move during training."""
    model = yaml.safe_load((run.run_dir / "config.yaml").read_text())["model"]
    return model["ffn"] == "moe" and router_class(model["router"]).uses_budget
