"""A study's results: mean and sample std over seeds per variant (paired differences to a reference), then
results.json, results.md and its plots (the frontier, the per-layer allocation, the loss curves) and, with
zero-shot tasks, their table; with committed summaries, the study report too (studies/study_report.py)."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import numpy as np
import torch

from softmoe.common.atomic import atomic_write_json, atomic_write_text
from softmoe.eval.plots import pyplot, save_figure, style_axes
from softmoe.routing import ROUTERS, router_class
from softmoe.studies.plan import PlannedRun, Study, Variant, shown_path
from softmoe.studies.study_report import write_study_report
from softmoe.studies.summaries import check_revisions
from softmoe.studies.verdicts import write_verdicts
from softmoe.train.metrics import read_metrics

__all__ = ["METRICS", "TASK_METRICS", "results_markdown", "seed_mean", "variant_colors", "write_results"]

METRICS = ("loss", "perplexity", "bits_per_byte", "active_experts_mean", "train_ae", "expert_flops_per_token",
           "tokens_per_sec")
TASK_METRICS = ("n", "acc", "acc_norm", "perplexity", "active_experts_mean")  # per zero-shot task and run


def _mean_std(values: list) -> dict:
    """{"mean", "std"} of the non-None values (mean None without any, sample std None with fewer than 2)."""
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def _aggregate(runs: list[dict], variants: tuple[Variant, ...], reference: str | None = None) -> list[dict]:
    """Mean and sample std over seeds of every metric, per variant (std None with one seed); zero-shot
    metrics per task under row["tasks"][task][metric].

    With a `reference` variant, row["loss_vs_reference"] holds the variant's val loss minus the reference's
    at the same seed (same batch order), mean ± std over the seeds both ran, and how many of them the
    variant won (lower loss); None for the reference itself and without shared seeds.
    """
    reference_loss = {r["seed"]: r["loss"] for r in runs if r["variant"] == reference}
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant.name]
        if not mine:
            continue
        row = {"variant": variant.name, "label": variant.label, "router": mine[0]["router"], "seeds": len(mine)}
        for key, default in (("causal", True), ("granularity", 1), ("num_shared_experts", 0)):
            row[key] = mine[0].get(key, default)
        for key in (*METRICS, "expert_equivalents"):
            row[key] = _mean_std([r.get(key) for r in mine])  # records of older runs may lack a metric
        tasks = sorted({task for r in mine for task in r.get("tasks", {})})
        row["tasks"] = {task: {key: _mean_std([r["tasks"].get(task, {}).get(key) for r in mine])
                               for key in TASK_METRICS} for task in tasks}
        # Multiple-choice tasks are the ones with acc_norm (LAMBADA has none).
        choice_acc = [np.mean(accs) for r in mine
                      if (accs := [res["acc"] for res in r.get("tasks", {}).values() if res["acc_norm"] is not None])]
        row["mean_choice_acc"] = _mean_std(choice_acc) if choice_acc else None
        deltas = [r["loss"] - reference_loss[r["seed"]] for r in mine
                  if reference_loss and r["seed"] in reference_loss]
        row["loss_vs_reference"] = None if variant.name == reference or not deltas else {
            **_mean_std(deltas), "seeds": len(deltas), "lower": sum(d < 0 for d in deltas)}
        rows.append(row)
    return rows


def _marker(family: str) -> str:
    """The plot marker of a router family (its class's `marker`); dense models are squares."""
    return "s" if family == "dense" else router_class(family).marker


def _hue(family: str) -> int:
    """A router family's tab10 colour (a qualitative palette): the router's place in the registry, skipping
    7 (grey), which is dense's; variants of one family get shades of it (`variant_colors`)."""
    if family == "dense" or family not in ROUTERS:
        return 7 if family == "dense" else 8
    index = list(ROUTERS).index(family)
    return index if index < 7 else index + 1


def variant_colors(variants: tuple[Variant, ...], records: list[dict]) -> dict[str, tuple]:
    """Colour of each variant, the same in every plot: its router family's hue, darker to lighter shades
    for the family's variants in study order (a family with one variant gets the plain hue)."""
    from matplotlib.colors import to_rgb

    plt = pyplot()
    family = {r["variant"]: r["router"] for r in records}
    colors = {}
    for name in dict.fromkeys(family.get(v.name, "dense") for v in variants):
        members = [v.name for v in variants if family.get(v.name, "dense") == name]
        hue = np.array(to_rgb(plt.cm.tab10(_hue(name) % 10)))
        for j, member in enumerate(members):
            t = 0.0 if len(members) == 1 else -0.45 + 0.9 * j / (len(members) - 1)  # <0 darker, >0 lighter
            shade = hue * (1 + t) if t < 0 else hue + (1 - hue) * t
            colors[member] = tuple(float(c) for c in np.clip(shade, 0, 1))
    return colors


def plot_frontier(rows: list[dict], records: list[dict], variants: tuple[Variant, ...], path: Path) -> Path:
    """Validation loss vs realized mean active experts: seeds as small points, the seed mean large."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    colors = variant_colors(variants, records)
    for row in rows:
        color, marker = colors[row["variant"]], _marker(row["router"])
        mine = [r for r in records if r["variant"] == row["variant"]]
        xs = [_x(r) for r in mine]
        ax.scatter(xs, [r["loss"] for r in mine], color=color, marker=marker, alpha=0.35, s=18)
        std = row["loss"]["std"]
        ax.errorbar([_x(row)], [row["loss"]["mean"]], yerr=None if std is None else [std], color=color,
                    marker=marker, ms=8, capsize=3, label=row["label"])
    style_axes(
        ax,
        "mean active experts per token (dense: FFN width in experts)",
        "validation loss (nats / token)",
        "Loss vs active experts (seeds: small points; mean ± std: large)",
        legend_size=7,
        legend_outside=True,
    )
    return save_figure(fig, path)


def _x(item: dict) -> float:
    """x of the frontier: realized active experts, or the FFN FLOPs in coarse experts (`expert_equivalents`)
    for dense models and for fine-grained or shared-expert variants (whose routed count is not comparable)."""
    value = item["active_experts_mean"]
    value = value["mean"] if isinstance(value, dict) else value
    if value is None or item.get("granularity", 1) != 1 or item.get("num_shared_experts", 0):
        value = item["expert_equivalents"]
        value = value["mean"] if isinstance(value, dict) else value
    return float(value)


def plot_allocation(records: list[dict], variants: tuple[Variant, ...], path: Path) -> Path | None:
    """Per-layer experts of the variable-count variants, mean over seeds: the learned k_l of the SoftMoE
    variants (left) and the realized active experts of every MoE variant whose count is not fixed (right:
    SoftMoE, top-p, null experts, ReMoE, ...; top-k's constant k is left out). None without SoftMoE runs."""
    plt = pyplot()
    soft = [v for v in variants if any(r["variant"] == v.name and r["k_L"] for r in records)]
    if not soft:
        return None
    variable = [v for v in variants if any(r["variant"] == v.name and r["router"] != "dense"
                                           and not router_class(r["router"]).fixed_active_experts for r in records)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    colors = variant_colors(variants, records)
    for variant in variable:
        mine = [r for r in records if r["variant"] == variant.name]
        active = np.mean([r["active_experts_per_layer"] for r in mine], axis=0)
        marker = _marker(mine[0]["router"])
        right.plot(np.arange(len(active)), active, color=colors[variant.name], marker=marker, label=variant.label)
        if variant in soft:
            k_L = np.mean([r["k_L"] for r in mine], axis=0)
            left.plot(np.arange(len(k_L)), k_L, color=colors[variant.name], marker=marker)
    for ax in (left, right):
        ax.set_xticks(np.arange(len(active)))  # every variant has the same MoE layers
    style_axes(left, "MoE layer", "experts per token (mean over seeds)", "Learned k_l (SoftMoE)", legend_size=0)
    style_axes(right, "MoE layer", "", "Realized active experts per token", legend_size=7,
               legend_outside=True)
    return save_figure(fig, path)


def plot_loss_curves(records: list[dict], variants: tuple[Variant, ...], path: Path) -> Path:
    """Training loss per variant: the mean over seeds (line) with a band of ± one std across seeds
    (2+ seeds), and the seed-mean validation loss (markers), on the steps every seed logged."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    colors = variant_colors(variants, records)
    for variant in variants:
        runs = [r for r in records if r["variant"] == variant.name]
        if not runs:
            continue
        color, seeds = colors[variant.name], len(runs)
        steps, mean, std = _series_mean([_curve(r, "train") for r in runs])
        ax.plot(steps, mean, color=color, lw=1.2, label=f"{variant.label} ({seeds} seed{'s' * (seeds > 1)})")
        if seeds > 1:
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        steps, mean, _ = _series_mean([_curve(r, "val") for r in runs])
        ax.plot(steps, mean, color=color, marker="o", ms=3, lw=0)
    style_axes(
        ax,
        "optimizer step",
        "cross-entropy (nats / token)",
        "Loss curves: mean over seeds ± std (lines: train, markers: validation)",
        legend_size=7,
        legend_outside=True,
    )
    return save_figure(fig, path)


def _curve(record: dict, split: str) -> dict[int, float]:
    """{step: loss} of one split of a run: from its summary's curves, else from its metrics.jsonl."""
    curves = record.get("curves")
    if curves is None:
        return {m["step"]: m["loss"] for m in read_metrics(Path(record["run_dir"]), split)
                if isinstance(m.get("loss"), (int, float))}
    return {step: loss for step, loss in zip(curves[split]["step"], curves[split]["loss"])
            if isinstance(loss, (int, float))}


def seed_mean(run_dirs: list[Path], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps logged by every run, mean loss over the runs, sample std; 0 for one run) of one split."""
    return _series_mean([_curve({"run_dir": run_dir}, split) for run_dir in run_dirs])


def _series_mean(series: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps in every series, mean over the series, sample std; 0 for one series)."""
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = np.array([[s[step] for step in steps] for s in series], dtype=float).reshape(len(series), len(steps))
    std = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(steps))
    return np.array(steps), values.mean(axis=0), std


def _pm(stat: dict, spec: str, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "-"
    text = format(stat["mean"] / scale, spec)
    return text if stat["std"] is None else f"{text} ± {format(stat['std'] / scale, spec)}"


def results_markdown(study: Study, runs: list[PlannedRun], rows: list[dict], plots: list[tuple[str, Path]]) -> str:
    c, limit = runs[0].config, study.evaluation.max_batches
    ref = None if study.reference is None else next(v.label for v in study.variants if v.name == study.reference)
    head = [f"# Study `{study.name}`", "",
            f"Study file `{shown_path(study.path)}`; base preset `{shown_path(study.base)}`. "
            f"Command: `softmoe compare --config {shown_path(study.path)}`.",
            f"Each run trains on {runs[0].tokens:,} tokens ({c.train.steps} steps x {c.train.grad_accum} x "
            f"{c.data.batch_size} x {c.data.seq_len}) of corpus `{c.data.corpus}`; seeds {list(study.seeds)} set "
            f"the init and the batch order. Scored on the whole `{study.evaluation.splits[0]}` split"
            + ("" if limit is None else f" (at most {limit} batches)") + ".",
            f"Machine: {platform.machine()}, torch {torch.__version__}. Mean ± sample std over seeds.", "",
            "| variant | seeds | val loss | perplexity | bits per byte | Train AE | Infer AE | "
            "FFN FLOPs / token (M) | train tok/s |" + ("" if ref is None else f" Δ val loss vs {ref} |"),
            "|---|---|---|---|---|---|---|---|---|" + ("" if ref is None else "---|")]
    for row in rows:
        cells = [_pm(row["loss"], ".4f"), _pm(row["perplexity"], ".2f"), _pm(row["bits_per_byte"], ".4f"),
                 _pm(row["train_ae"], ".3f"), _pm(row["active_experts_mean"], ".3f"),
                 _pm(row["expert_flops_per_token"], ".3f", 1e6),
                 _pm(row["tokens_per_sec"], ",.0f")]
        if ref is not None:
            delta = row.get("loss_vs_reference")
            cells.append("(reference)" if row["variant"] == study.reference else "-" if delta is None else
                         f"{delta['mean']:+.4f}" + ("" if delta["std"] is None else f" ± {delta['std']:.4f}")
                         + f" (lower in {delta['lower']}/{delta['seeds']})")
        mark = "" if row.get("causal", True) else " †"
        head.append(f"| {row['label']}{mark} | {row['seeds']} | " + " | ".join(cells) + " |")
    head += ["", "FFN FLOPs count the realized routed and shared experts of MoE layers and the whole FFN of dense "
             "layers (matmuls only, 2 per multiply-add); dense models have no active-expert count. AE (active "
             "experts, the paper's name) counts routed experts per token (fine-grained ones with granularity > 1): "
             "Train AE in training mode over the last 20% of logged steps, Infer AE in eval mode on the scored "
             "split."
             + ("" if ref is None else f" Δ val loss: the variant's loss minus {ref}'s at the same seed (same "
                "batch order), mean ± std over the seeds both ran; \"lower in\" counts the seeds where the "
                "variant's loss is lower."), ""]
    if not all(row.get("causal", True) for row in rows):
        head += ["† non-causal router (expert choice): a token's experts depend on the other tokens of its batch, "
                 "later positions included, so its loss is not comparable as a language model and it cannot "
                 "decode with a KV cache; a reference point only.", ""]
    head += _zero_shot_markdown(study, rows)
    for caption, path in plots:
        head += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    return "\n".join(head)


def _zero_shot_markdown(study: Study, rows: list[dict]) -> list[str]:
    """The zero-shot section: per variant and task, acc / acc_norm (LAMBADA: acc and perplexity), mean ±
    std over seeds, and the mean acc over the multiple-choice tasks. Empty without tasks."""
    tasks = sorted({task for row in rows for task in row["tasks"]})
    if not tasks:
        return []
    choice = [t for t in tasks if all(row["tasks"].get(t, {}).get("acc_norm", {}).get("mean") is not None
                                      for row in rows if t in row["tasks"])]
    items = {t: next(int(row["tasks"][t]["n"]["mean"]) for row in rows if t in row["tasks"]) for t in tasks}
    limit = study.evaluation.limit
    lines = ["## Zero-shot tasks", "",
             "Per task: acc / acc_norm (lm-evaluation-harness definitions), mean ± std over seeds; LAMBADA: "
             "last-word accuracy / perplexity of the last word. Items per task: "
             + ", ".join(f"{t} {items[t]:,}" for t in tasks)
             + ("" if limit is None else f" (at most {limit} each, the first of the split)") + ". "
             "Mean acc averages acc over the multiple-choice tasks of each run, then over seeds.", "",
             "| variant | " + " | ".join(tasks) + " | mean acc (" + ", ".join(choice) + ") |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for row in rows:
        cells = []
        for task in tasks:
            stats = row["tasks"].get(task)
            if stats is None:
                cells.append("-")
            elif task in choice:
                cells.append(f"{_pm(stats['acc'], '.3f')} / {_pm(stats['acc_norm'], '.3f')}")
            else:
                cells.append(f"{_pm(stats['acc'], '.3f')} / ppl {_pm(stats['perplexity'], ',.0f')}")
        mean_acc = row.get("mean_choice_acc")
        cells.append("-" if mean_acc is None else _pm(mean_acc, ".4f"))
        mark = "" if row.get("causal", True) else " †"
        lines.append(f"| {row['label']}{mark} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_results(study: Study, runs: list[PlannedRun], records: list[dict], mixed_revisions: bool = False) -> Path:
    """results.json, results.md and the plots into the study's out_dir; returns results.md.

    ValueError when the runs mix code revisions (summaries.check_revisions), unless `mixed_revisions`."""
    mixed = check_revisions([(r.get("summary_run") or r.get("variant"), r.get("revision")) for r in records],
                            allow_dirty=not study.pinned_revision)
    if mixed and not mixed_revisions:
        raise ValueError(f"study {study.name}: {mixed}; a study's results do not mix code revisions (pass "
                         f"--mixed-revisions to write them anyway)")
    out = study.out_dir
    rows = _aggregate(records, study.variants, study.reference)
    frontier = plot_frontier(rows, records, study.variants, out / "frontier.png")
    plots = [("Frontier: validation loss vs mean active experts", frontier)]
    allocation = plot_allocation(records, study.variants, out / "allocation.png")
    if allocation is not None:
        plots.append(("Per-layer allocation: learned k_l and realized active experts", allocation))
    plots.append(("Loss curves", plot_loss_curves(records, study.variants, out / "loss_curves.png")))
    atomic_write_json(out / "results.json", {
        "study": study.name, "study_file": str(study.path), "base": str(study.base), "seeds": list(study.seeds),
        "reference": study.reference,
        "tokens_per_run": runs[0].tokens, "eval": dataclasses.asdict(study.evaluation), "variants": rows,
        "runs": records})
    atomic_write_text(out / "results.md", results_markdown(study, runs, rows, plots))
    if study.summaries is not None:
        report = write_study_report(study, records, study.summaries, planned=len(runs))
        print(f"study report written: {shown_path(report)}", flush=True)
        verdicts = write_verdicts(study, records, study.summaries, planned=len(runs))
        if verdicts is not None:
            print(f"registered verdicts written: {shown_path(verdicts)}", flush=True)
    return out / "results.md"
