"""The study report: the paper's claims against a study's runs, with seed intervals.

`write_study_report(study, records, out_dir)` writes `report.md` and its plots from compare records (the
committed run summaries of softmoe/studies/summaries.py, or fresh runs). Nothing in it is typed in: every
number comes from the records, every "holds?" from a stated rule.

Intervals: over seeds, the 95% Student-t interval of the mean (mean ± t_{0.975, n-1} s / sqrt(n)); with
one seed there is none ("n=1"). Paired differences subtract the reference's value at the same seed (the
same batches), so the batch-order part of the seed noise cancels. Zero-shot accuracies of one seed carry
the evaluation's bootstrap interval over items instead.

The claims table reads the study's `claims:` roles (CLAIM_ROLES): which variant is top-2, the learned
SoftMoE, ... A claim whose variants are missing (a study in progress) says so. The paper's numbers it is read
against and the verdict rules' margins are the study's `paper:` block (PaperClaims), not code; a study
without one has no claims table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from softmoe.data.io import atomic_write_text
from softmoe.eval.plots import panel_grid, pyplot, save_figure, style_axes, wrapped

__all__ = ["CLAIM_ROLES", "fmt_interval", "CLAIMS", "PaperClaims", "SETTLE_TOL", "t_interval", "paired", "allocation_movement", "claims_rows",
           "study_report_markdown", "write_study_report", "plot_frontier_ae", "plot_k_trajectories", "plot_depth",
           "plot_dial", "plot_spread", "plot_load_heatmap"]

CLAIM_ROLES = frozenset({"top2", "top3", "top4", "learned", "learned_K2", "fixed", "compute_matched", "larger_c"})
# The claims of the table, each with the key of its paper's number in the study's `paper.numbers`.
CLAIMS = ("loss_vs_top2", "fixed_vs_top2", "compute_matched", "larger_c", "downstream", "depth", "infer_vs_train")
# Chance accuracy of the multiple-choice tasks (uniform guessing over the choices).
CHANCE = {"piqa": 0.5, "copa": 0.5, "winogrande": 0.5, "boolq": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25,
          "sciq": 0.25, "hellaswag": 0.25, "openbookqa": 0.25}
# k_l "settled": no layer's k_l moved more than this over the last 20% of the logged steps (mean over seeds).
SETTLE_TOL = 0.05
# Student t quantiles t_{0.975, df}, df = 1..30 (beyond: 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class PaperClaims:
    """The study's `paper:` block: what the claims table reads the runs against.

    margin: nats; "comparable" = the paired loss difference's 95% interval lies below +margin.
    best_margin: nats; the larger cap's margin against top-4 ("gives the best loss": 0 means lower).
    accuracy_margin: downstream "comparable" = the paired mean accuracy difference's interval lies above
        -accuracy_margin.
    late_share: the paper's share of the budget in the last 30% of the layers; the depth verdict is "yes" when
        the measured share is at least halfway from uniform to it.
    numbers: the paper's number of each claim (CLAIMS), as the table prints it; a claim without one prints "-".
    """

    margin: float
    best_margin: float
    accuracy_margin: float
    late_share: float
    numbers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw, where: str = "paper") -> PaperClaims:
        """Parse and check the study's `paper:` block."""
        rules = ("margin", "best_margin", "accuracy_margin", "late_share")
        if not isinstance(raw, dict) or set(raw) - {*rules, "numbers"} or set(rules) - set(raw):
            raise ValueError(f"{where}={raw!r} must be a mapping with {', '.join(rules)} and optional numbers")
        values = {}
        for key in rules:
            if isinstance(raw[key], bool) or not isinstance(raw[key], (int, float)):
                raise ValueError(f"{where}.{key}={raw[key]!r} must be a number")
            values[key] = float(raw[key])
        numbers = raw.get("numbers") or {}
        if not isinstance(numbers, dict) or set(numbers) - set(CLAIMS) or not all(isinstance(v, str)
                                                                                 for v in numbers.values()):
            raise ValueError(f"{where}.numbers={numbers!r} must map claims from {list(CLAIMS)} to text")
        return cls(**values, numbers=dict(numbers))

    def number(self, claim: str) -> str:
        return self.numbers.get(claim, "-")


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def t_interval(values) -> dict:
    """{"mean", "low", "high", "n"} of the non-None values: the 95% t-interval of the mean (low/high None
    with fewer than 2 values; everything None without any)."""
    values = [float(v) for v in values if v is not None]
    n = len(values)
    if not n:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def _of(records: list[dict], variant: str) -> list[dict]:
    return [r for r in records if r["variant"] == variant]


def paired(records: list[dict], variant: str, reference: str, key=lambda r: r["loss"]) -> dict | None:
    """The variant's `key` minus the reference's at the same seed: t_interval of the differences plus
    "lower" (seeds where the variant's value is lower). None without a shared seed."""
    ref = {r["seed"]: key(r) for r in _of(records, reference)}
    deltas = [key(r) - ref[r["seed"]] for r in _of(records, variant)
              if r["seed"] in ref and key(r) is not None and ref[r["seed"]] is not None]
    if not deltas:
        return None
    return {**t_interval(deltas), "lower": sum(d < 0 for d in deltas)}


def _stat(records: list[dict], variant: str, key) -> dict:
    return t_interval([key(r) for r in _of(records, variant)])


def fmt_interval(stat: dict | None, spec: str = ".3f", signed: bool = False) -> str:
    """mean [low, high] (n), or mean (n=1), or "-"."""
    if stat is None or stat["mean"] is None:
        return "-"
    sign = "+" if signed else ""
    text = format(stat["mean"], sign + spec)
    if stat["low"] is None:
        return f"{text} (n=1)"
    return f"{text} [{format(stat['low'], sign + spec)}, {format(stat['high'], sign + spec)}] (n={stat['n']})"


def _mean_choice_acc(record: dict) -> float | None:
    accs = [res["acc"] for res in record.get("tasks", {}).values() if res.get("acc_norm") is not None]
    return float(np.mean(accs)) if accs else None


def _late_layers(n_layers: int) -> int:
    """How many of `n_layers` the late share counts: the last 30%, rounded up (3 of 8, 3 of 10)."""
    return math.ceil(0.3 * n_layers)


def _late_share(per_layer) -> float | None:
    """Fraction of the sum of a per-layer quantity [layers] (k_l, or the realized active experts) held by the
    last ceil(30%) of the layers (the paper: the last 3 of 10 blocks take about half the budget)."""
    if not per_layer:
        return None
    last = _late_layers(len(per_layer))
    return float(sum(per_layer[-last:]) / sum(per_layer))


def _at_fraction(trajectory: dict, fraction: float) -> list[float]:
    """k_l [layers] at the logged step nearest to `fraction` of the trajectory's last step."""
    steps = trajectory["step"]
    target = fraction * steps[-1]
    i = min(range(len(steps)), key=lambda j: abs(steps[j] - target))
    return trajectory["k_L"][i]


def allocation_movement(records: list[dict], variant: str) -> dict | None:
    """How a learned allocation moved over training, from the summaries' k_l trajectories (mean over seeds):
    {"seeds", "late_share": {fraction: share of Σk_l in the last 30% of layers}, "last_move": [layers] k_l at
    the end minus at 80% of the steps, "settled": every |last_move| <= SETTLE_TOL}. None when the variant has
    no trajectory or its k_l never moved (a fixed k)."""
    trajs = [r["k_trajectory"] for r in _of(records, variant)
             if r.get("k_trajectory", {}).get("k_L") and len(r["k_trajectory"]["step"]) >= 2]
    if not trajs or all(np.ptp(t["k_L"], axis=0).max() == 0 for t in trajs):
        return None
    fractions = (0.25, 0.5, 0.75, 1.0)
    share = {f: float(np.mean([_late_share(_at_fraction(t, f)) for t in trajs])) for f in fractions}
    last_move = np.mean([np.subtract(_at_fraction(t, 1.0), _at_fraction(t, 0.8)) for t in trajs], axis=0)
    return {"seeds": len(trajs), "late_share": share, "last_move": [float(m) for m in last_move],
            "settled": bool(np.abs(last_move).max() <= SETTLE_TOL)}


def _largest_rise(record: dict) -> float | None:
    """The largest rise between consecutive logged train losses (each a mean over the log interval)."""
    loss = record.get("curves", {}).get("train", {}).get("loss") or []
    rises = [b - a for a, b in zip(loss, loss[1:]) if a is not None and b is not None]
    return max(rises) if rises else None


# --------------------------------------------------------------------------------------------
# The claims table
# --------------------------------------------------------------------------------------------


def _verdict_loss(delta: dict | None, margin: float) -> str:
    if delta is None or delta["mean"] is None:
        return "not yet measured"
    if delta["low"] is None:
        return "not resolved (one seed)"
    if delta["high"] < 0:
        return "yes (lower loss)"
    if delta["high"] < margin:
        return f"yes (comparable: interval below +{margin})"
    if delta["low"] > margin:
        return "no (higher loss)"
    return "not resolved (interval spans the margin)"


def claims_rows(records: list[dict], roles: dict[str, str], paper: PaperClaims) -> list[tuple[str, str, str, str]]:
    """(claim, paper's number, ours, holds?) for every claim the roles allow (see the module docstring)."""
    rows = []
    top2, learned = roles.get("top2"), roles.get("learned")
    have = {r["variant"] for r in records}

    def missing(*names) -> str | None:
        gone = [n for n in names if n is None or n not in have]
        return None if not gone else "not yet measured (" + ", ".join(str(n) for n in gone) + " missing)"

    # (1) LM loss vs top-2 with fewer active experts
    claim = "LM loss comparable to or better than top-2 while activating fewer experts (learned SoftMoE, K = 1.5)"
    number = paper.number("loss_vs_top2")
    gap = missing(top2, learned)
    if gap:
        rows.append((claim, number, "-", gap))
    else:
        delta = paired(records, learned, top2)
        train, infer = _stat(records, learned, lambda r: r.get("train_ae")), _stat(records, learned,
                                                                                   lambda r: r["active_experts_mean"])
        fewer = infer["mean"] is not None and train["mean"] is not None and max(infer["mean"], train["mean"]) < 2
        verdict = _verdict_loss(delta, paper.margin)
        if verdict.startswith("yes") and not fewer:
            verdict = "no (not fewer experts than top-2)"
        rows.append((claim, number, f"Δ loss {fmt_interval(delta, '.4f', True)}; Train AE {fmt_interval(train, '.2f')}, "
                                   f"Infer AE {fmt_interval(infer, '.2f')}", verdict))
    # (1b) the fixed-k SoftMoE*, (1c) at equal realized expert FLOPs, (1d) a larger cap
    for claim, number, variant, reference, ae_key, margin in (
            ("SoftMoE* (fixed uniform k = 1.5) comparable to top-2 at fewer experts", paper.number("fixed_vs_top2"),
             roles.get("fixed"), top2, "active_experts_mean", paper.margin),
            ("At equal realized expert FLOPs (SoftMoE held at AE = 2 by the controller) vs top-2",
             paper.number("compute_matched"), roles.get("compute_matched"), top2, "train_ae", paper.margin),
            ("A larger cap (SoftMoE* k = 1, c = 4) gives the best loss, below top-4", paper.number("larger_c"),
             roles.get("larger_c"), roles.get("top4"), "active_experts_mean", paper.best_margin)):
        gap = missing(reference, variant)
        if gap:
            rows.append((claim, number, "-", gap))
            continue
        delta = paired(records, variant, reference)
        ae = _stat(records, variant, lambda r: r.get(ae_key))
        ae_name = "Train AE" if ae_key == "train_ae" else "Infer AE"
        rows.append((claim, number, f"Δ loss vs {reference} {fmt_interval(delta, '.4f', True)}; {ae_name} {fmt_interval(ae, '.2f')}",
                     _verdict_loss(delta, margin)))
    # (2) downstream
    claim = "Downstream zero-shot accuracy comparable or better than top-2 (learned SoftMoE)"
    number = paper.number("downstream")
    gap = missing(top2, learned)
    if gap or not any(r.get("tasks") for r in _of(records, top2)):
        rows.append((claim, number, "-", gap or "not measured (no zero-shot tasks in the study)"))
    else:
        delta = paired(records, learned, top2, key=_mean_choice_acc)
        above = _above_chance(records, top2)
        ours = f"Δ mean acc {fmt_interval(delta, '.4f', True)}; top-2 above chance on: {', '.join(above) or 'no task'}"
        if not above:
            verdict = "untestable here (top-2 at chance on every task)"
        elif delta is None or delta["low"] is None:
            verdict = "not resolved (one seed)"
        else:
            low = -paper.accuracy_margin
            verdict = ("yes" if delta["low"] > low else "no" if delta["high"] < low else "not resolved")
        rows.append((claim, number, ours, verdict))
    # (3) allocation by depth
    claim = "The learned allocation is non-uniform: later layers take more (last 30% of layers)"
    number = paper.number("depth")
    learned_names = [n for n in (learned, roles.get("learned_K2")) if n in have]
    if not learned_names:
        rows.append((claim, number, "-", missing(learned) or "-"))
    else:
        parts, verdicts = [], []
        for name in learned_names:
            n_layers = len(_of(records, name)[0].get("k_L") or [])  # every MoE layer, so the same for both
            last = _late_layers(n_layers)
            uniform = last / n_layers if n_layers else None
            budget = _stat(records, name, lambda r: _late_share(r.get("k_L")))
            realized = _stat(records, name, lambda r: _late_share(r.get("train_ae_per_layer")))
            parts.append(f"{name}, last {last} of {n_layers} layers (uniform {uniform:.3f}): share of Σk_l "
                         f"{fmt_interval(budget, '.3f')}, share of the realized Train AE {fmt_interval(realized, '.3f')}")
            verdict = f"{name}: k_l {_depth_verdict(budget, uniform, paper.late_share)}"
            movement = allocation_movement(records, name)
            if movement is not None and not movement["settled"]:
                moving = movement["late_share"][1.0] - movement["late_share"][0.5]
                verdict += (f" at the end of training, k_l not settled (late share {moving:+.3f} over the second "
                            "half)")
            verdicts.append(f"{verdict}; realized AE {_depth_verdict(realized, uniform, paper.late_share)}")
        rows.append((claim, number, "; ".join(parts), "; ".join(verdicts)))
    # (4) Train AE vs Infer AE
    claim = "Infer AE exceeds Train AE (learned SoftMoE)"
    number = paper.number("infer_vs_train")
    gap = missing(learned)
    if gap:
        rows.append((claim, number, "-", gap))
    else:
        gap_stat = _stat(records, learned, lambda r: None if r.get("train_ae") is None
                         else r["active_experts_mean"] - r["train_ae"])
        verdict = ("not resolved (one seed)" if gap_stat["low"] is None else "yes" if gap_stat["low"] > 0
                   else "no (Infer AE below Train AE)" if gap_stat["high"] < 0 else "not resolved")
        rows.append((claim, number, f"Infer AE - Train AE {fmt_interval(gap_stat, '.3f', True)}", verdict))
    return rows


def _depth_verdict(share: dict, uniform: float, paper_share: float) -> str:
    """Whether the last 30% of the layers take more than their uniform share: "yes" when the interval lies above
    uniform and the mean is at least halfway from uniform to the paper's share (0.4375 for 8 layers and the
    paper's ~half), "direction only" when it lies above uniform but short of that."""
    if share["low"] is None:
        return "not resolved (one seed)"
    if share["low"] > uniform:
        return ("yes" if share["mean"] >= (uniform + paper_share) / 2
                else "direction only (later layers take more, less than the paper's ~half)")
    if share["high"] < uniform:
        return "no (earlier layers take more)"
    return "not resolved"


def _above_chance(records: list[dict], variant: str) -> list[str]:
    """Tasks where every seed's bootstrap interval of acc and of acc_norm lies above chance (acc alone can:
    a 3-step model scored COPA acc 0.61 [0.51, 0.71] by preferring short answers; its acc_norm was 0.54)."""
    out = []
    for task, chance in CHANCE.items():
        lows = [r.get("task_ci", {}).get(task, {}).get(metric, [None])[0] for r in _of(records, variant)
                for metric in ("acc", "acc_norm")]
        if lows and all(low is not None and low > chance for low in lows):
            out.append(task)
    return out


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _colors(variants) -> dict[str, tuple]:
    plt = pyplot()
    return {v.name: plt.cm.tab20(i % 20) for i, v in enumerate(variants)}


def plot_frontier_ae(records: list[dict], variants, path: Path) -> Path:
    """Val loss vs Train AE (left) and Infer AE (right): seeds small, mean with 95% intervals (both axes)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colors = _colors(variants)
    for ax, key, name in ((axes[0], "train_ae", "Train AE"), (axes[1], "active_experts_mean", "Infer AE")):
        for v in variants:
            mine = [r for r in _of(records, v.name) if r.get(key) is not None]
            if not mine:
                continue
            ax.scatter([r[key] for r in mine], [r["loss"] for r in mine], color=colors[v.name], s=14, alpha=0.4)
            x, y = t_interval([r[key] for r in mine]), t_interval([r["loss"] for r in mine])
            err = (lambda s: None if s["low"] is None else [[s["mean"] - s["low"]], [s["high"] - s["mean"]]])
            ax.errorbar([x["mean"]], [y["mean"]], xerr=err(x), yerr=err(y), color=colors[v.name], marker="o",
                        ms=6, capsize=3, label=f"{v.label} (n={y['n']})")
        style_axes(ax, f"{name}: realized mean active experts per token", "validation loss (nats / token)",
                   f"Loss vs {name} (mean, 95% seed interval)", legend_size=0)
    handles, labels = axes[1].get_legend_handles_labels()
    axes[1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save_figure(fig, path)


def plot_k_trajectories(records: list[dict], variants, path: Path) -> Path | None:
    """k_l over training, one panel per learned-budget variant, one line per layer (mean over seeds;
    colour by depth), the realized Train AE of the layer dashed, and the relative threshold (dotted, right
    axis) where the active-experts controller moved it."""
    plt = pyplot()
    learned = [v for v in variants if any(r.get("k_trajectory", {}).get("k_L") for r in _of(records, v.name))]
    if not learned:
        return None
    fig, axes = panel_grid(len(learned), 4.6, 4.4)
    for ax, v in zip(axes, learned):
        trajs = [r["k_trajectory"] for r in _of(records, v.name) if r.get("k_trajectory", {}).get("k_L")]
        steps = sorted(set.intersection(*(set(t["step"]) for t in trajs)))
        k = np.mean([[t["k_L"][t["step"].index(s)] for s in steps] for t in trajs], axis=0)  # [steps, L]
        a = np.mean([[t["active_L"][t["step"].index(s)] for s in steps] for t in trajs], axis=0)
        cmap = plt.cm.viridis
        for layer in range(k.shape[1]):
            color = cmap(layer / max(k.shape[1] - 1, 1))
            ax.plot(steps, k[:, layer], color=color, lw=1.4, label=f"layer {layer}")
            ax.plot(steps, a[:, layer], color=color, lw=0.7, ls="--", alpha=0.6)
        style_axes(ax, "optimizer step", "experts per token", wrapped(f"{v.label} (n={len(trajs)})"),
                   legend_size=6 if ax is axes[0] else 0)
        threshold = _moved_threshold(trajs, steps)
        if threshold is not None:  # the active-experts controller's lever
            twin = ax.twinx()
            twin.plot(steps, threshold, color="black", lw=1.2, ls=":")
            twin.set_ylabel("relative threshold (dotted)", fontsize=8)
    fig.suptitle("Learned k_l over training (solid), realized Train AE per layer (dashed)", fontsize=10)
    return save_figure(fig, path)


def _moved_threshold(trajs: list[dict], steps: list[int]) -> np.ndarray | None:
    """The mean over seeds of the routers' relative threshold at `steps`, when every trajectory logged it and it
    moved (a run with the active-experts controller on the threshold); else None."""
    if not all(t.get("threshold") for t in trajs):
        return None
    values = np.mean([[t["threshold"][t["step"].index(s)] for s in steps] for t in trajs], axis=0)
    return values if np.ptp(values) > 0 else None


def plot_depth(records: list[dict], variants, path: Path) -> Path | None:
    """By depth: learned k_l (left), realized Train AE and Infer AE (right), mean over seeds with 95%
    intervals, for the variants whose count is not fixed."""
    plt = pyplot()
    variable = [v for v in variants
                if any(len(set(np.round(r.get("active_experts_per_layer") or [0], 6))) > 1 or r.get("k_L")
                       for r in _of(records, v.name))]
    if not variable:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors = _colors(variants)
    for v in variable:
        mine = _of(records, v.name)
        for ax, key, style in ((left, "k_L", "-"), (right, "train_ae_per_layer", "--"),
                               (right, "active_experts_per_layer", "-")):
            rows = [r[key] for r in mine if r.get(key)]
            if not rows:
                continue
            stats = [t_interval(col) for col in zip(*rows)]
            x = np.arange(len(stats))
            mean = np.array([s["mean"] for s in stats])
            ax.plot(x, mean, color=colors[v.name], ls=style, marker="o", ms=3,
                    label=f"{v.label}" + (" (Train AE)" if key == "train_ae_per_layer" else ""))
            if stats[0]["low"] is not None:
                ax.fill_between(x, [s["low"] for s in stats], [s["high"] for s in stats], color=colors[v.name],
                                alpha=0.15, lw=0)
    style_axes(left, "MoE layer (depth)", "experts per token", "Learned k_l by depth", legend_size=0)
    style_axes(right, "MoE layer (depth)", "", "Realized active experts by depth (solid: Infer, dashed: Train)",
               legend_size=6, legend_outside=True)
    return save_figure(fig, path)


def plot_dial(records: list[dict], variants, path: Path) -> Path | None:
    """Budget dial: val loss vs realized Infer AE at each K' (mean over seeds), beside every variant trained
    at its own count (small markers: the frontier the dial is to be read against)."""
    plt = pyplot()
    dialled = [v for v in variants if any(r.get("dial") for r in _of(records, v.name))]
    if not dialled:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = _colors(variants)
    for v in dialled:
        points = _dial_points(records, v.name)
        xs = [p["active"]["mean"] for p in points]
        ax.plot(xs, [p["loss"]["mean"] for p in points], color=colors[v.name], marker="o", label=v.label)
        for p, x in zip(points, xs):
            ax.annotate(f"K'={p['budget']:g}", (x, p["loss"]["mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for v in variants:
        mine = [r for r in _of(records, v.name) if r.get("active_experts_mean") is not None]
        if mine and v not in dialled:
            ax.scatter([t_interval([r["active_experts_mean"] for r in mine])["mean"]],
                       [t_interval([r["loss"] for r in mine])["mean"]], color=colors[v.name], marker="^", s=40,
                       label=v.label)
    style_axes(ax, "Infer AE (realized mean active experts)", "validation loss (nats / token)",
               "Budget dial: learned models evaluated at K' without retraining", legend_size=7, legend_outside=True)
    return save_figure(fig, path)


def _dial_points(records: list[dict], variant: str) -> list[dict]:
    """Per K' of a variant's dial: budget, loss and Infer AE t-intervals over seeds, and the seeds."""
    by_budget: dict[float, list[dict]] = {}
    for r in _of(records, variant):
        for p in r.get("dial") or []:
            by_budget.setdefault(float(p["budget"]), []).append({**p, "seed": r["seed"]})
    return [{"budget": b, "loss": t_interval([p["loss"] for p in ps]),
             "active": t_interval([p["active_experts_mean"] for p in ps]), "points": ps}
            for b, ps in sorted(by_budget.items())]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def study_report_markdown(study, records: list[dict], plots: list[tuple[str, Path]], planned: int) -> str:
    variants = [v for v in study.variants if _of(records, v.name)]
    refs = [r for r in study.references if _of(records, r)]
    label = {v.name: v.label for v in study.variants}
    lines = [f"# Study `{study.name}`: report", "",
             f"{len(records)} of {planned} planned runs summarised. Intervals: 95% Student-t over seeds "
             f"(n = seeds); n=1 has none. Δ: the variant's val loss minus the reference's, paired by seed (same "
             f"batches); negative is better; \"lower in a/n\": the variant's loss was lower on a of the n seeds.", ""]
    if getattr(study, "preregistration", None):
        lines += ["Pre-registered: the registered verdicts, each rule with its checks, are in "
                  "[verdicts.md](verdicts.md).", ""]
    lines += _claims_lines(records, dict(study.claims), study.paper) if study.paper is not None else []
    head = "| variant | val loss | Train AE | Infer AE |" + "".join(f" Δ vs {label[r]} (lower in) |" for r in refs)
    lines += ["", "## Loss, active experts and paired differences", "", head,
              "|---|---|---|---|" + "---|" * len(refs)]
    for v in variants:
        cells = [fmt_interval(_stat(records, v.name, lambda r: r["loss"]), ".4f"),
                 fmt_interval(_stat(records, v.name, lambda r: r.get("train_ae")), ".3f"),
                 fmt_interval(_stat(records, v.name, lambda r: r["active_experts_mean"]), ".3f")]
        for ref in refs:
            d = None if ref == v.name else paired(records, v.name, ref)
            cells.append("(reference)" if ref == v.name else "-" if d is None else
                         f"{fmt_interval(d, '.4f', True)} ({d['lower']}/{d['n']})")
        lines.append(f"| {v.label} | " + " | ".join(cells) + " |")
    lines += _allocation_lines(records, variants) + _movement_lines(records, variants)
    lines += _dial_lines(records, variants, study.references[:1], label) + _stability_lines(records, variants)
    lines += _diagnostic_lines(records, variants) + _task_lines(records, variants)
    for caption, path in plots:
        lines += ["", f"## {caption}", "", f"![{caption}]({path.name})"]
    return "\n".join(lines) + "\n"


def _claims_lines(records: list[dict], roles: dict[str, str], paper: PaperClaims) -> list[str]:
    """The paper's claims section (a study with the paper's numbers: its `paper:` block)."""
    return ["## Paper's claims", "",
            f"Rule: \"comparable\" = the 95% interval of the paired loss difference lies below +{paper.margin} nats; "
            "\"lower\" = below 0; \"not resolved\" = the interval spans the margin or there is one seed.", "",
            "| paper's claim | paper's number | ours | holds? |", "|---|---|---|---|",
            *("| " + " | ".join(row) + " |" for row in claims_rows(records, roles, paper))]


def _allocation_lines(records: list[dict], variants) -> list[str]:
    rows = []
    for v in variants:
        mine = _of(records, v.name)
        k = [r["k_L"] for r in mine if r.get("k_L")]
        train = [r["train_ae_per_layer"] for r in mine if r.get("train_ae_per_layer")]
        infer = [r["active_experts_per_layer"] for r in mine if r.get("active_experts_per_layer")]
        if not k and not any(len(set(np.round(x, 6))) > 1 for x in infer):
            continue
        col = (lambda rows_: "-" if not rows_ else ", ".join(f"{m:.2f}" for m in np.mean(rows_, axis=0)))
        rows.append(f"| {v.label} | {len(mine)} | {col(k)} | {col(train)} | {col(infer)} |")
    if not rows:
        return []
    return ["", "## Allocation by depth (mean over seeds, first to last MoE layer)", "",
            "| variant | seeds | learned k_l | Train AE per layer | Infer AE per layer |", "|---|---|---|---|---|",
            *rows]


def _movement_lines(records: list[dict], variants) -> list[str]:
    rows, n_layers = [], 0
    for v in variants:
        m = allocation_movement(records, v.name)
        if m is None:
            continue
        n_layers = len(m["last_move"])
        shares = " / ".join(f"{m['late_share'][f]:.3f}" for f in (0.25, 0.5, 0.75, 1.0))
        moves = ", ".join(f"{x:+.3f}" for x in m["last_move"])
        rows.append(f"| {v.label} | {m['seeds']} | {shares} | {moves} | {'yes' if m['settled'] else 'no'} |")
    if not rows:
        return []
    return ["", "## How the learned allocation moved (k_l trajectories, mean over seeds)", "",
            f"Late share: the share of Σk_l held by the last 30% of the layers, rounded up (the last "
            f"{_late_layers(n_layers)} of {n_layers}), at 25 / 50 / 75 / 100% of the steps. "
            f"Settled: no layer's k_l moved more than {SETTLE_TOL} over the last 20% of the steps.", "",
            "| variant | seeds | late share at 25 / 50 / 75 / 100% | k_l change over the last 20% (first to last "
            "layer) | settled? |", "|---|---|---|---|---|", *rows]


def _stability_lines(records: list[dict], variants) -> list[str]:
    rows = []
    for v in variants:
        mine = _of(records, v.name)
        rises = [x for x in map(_largest_rise, mine) if x is not None]
        skipped = [r.get("skipped_steps") for r in mine if r.get("skipped_steps") is not None]
        if not rises:
            continue
        rows.append(f"| {v.label} | {len(mine)} | {max(rises):+.3f} | {sum(skipped) if skipped else '-'} |")
    if not rows:
        return []
    return ["", "## Training stability (the logged train loss, each point a mean over its log interval)", "",
            "| variant | runs | largest rise between logged losses (worst run) | skipped steps (all runs) |",
            "|---|---|---|---|", *rows]


def _dial_lines(records: list[dict], variants, reference: tuple[str, ...], label: dict[str, str]) -> list[str]:
    rows = []
    ref = {r["seed"]: r["loss"] for r in _of(records, reference[0])} if reference else {}
    for v in variants:
        for p in _dial_points(records, v.name):
            deltas = [q["loss"] - ref[q["seed"]] for q in p["points"] if q["seed"] in ref]
            d = t_interval(deltas) if deltas else None
            rows.append(f"| {v.label} | {p['budget']:g} | {fmt_interval(p['loss'], '.4f')} | {fmt_interval(p['active'], '.3f')} | "
                        f"{fmt_interval(d, '.4f', True)} |")
    if not rows:
        return []
    return ["", "## Budget dial (trained models evaluated at K' without retraining)", "",
            f"| variant | K' | val loss | Infer AE | Δ vs {label[reference[0]] if reference else '-'} (paired) |",
            "|---|---|---|---|---|", *rows]


def _layer_mean(rows: list[list[float]]) -> str:
    return "-" if not rows else ", ".join(f"{m:.2f}" for m in np.mean(rows, axis=0))


def _diagnostic_lines(records: list[dict], variants) -> list[str]:
    """Per variant and layer (mean over seeds, final evaluation): logit spread, kept weight at the end of training,
    dead experts and max/mean load; from summaries that carry the routing diagnostics."""
    rows = []
    for v in variants:
        mine = [r for r in _of(records, v.name) if (r.get("routing") or {}).get("layers")]
        if not mine:
            continue
        layers = [r["routing"]["layers"] for r in mine]
        spread = [[layer.get("logit_spread") for layer in ls] for ls in layers if "logit_spread" in ls[0]]
        dead = [[layer.get("dead_fraction") for layer in ls] for ls in layers if "dead_fraction" in ls[0]]
        peak = [[layer.get("load_max_over_mean") for layer in ls] for ls in layers if "load_max_over_mean" in ls[0]]
        weight = [r["k_trajectory"]["weight_L"][-1] for r in mine if (r.get("k_trajectory") or {}).get("weight_L")]
        rows.append(f"| {v.label} | {len(mine)} | {_layer_mean(spread)} | {_layer_mean(weight)} | "
                    f"{_layer_mean(dead)} | {_layer_mean(peak)} |")
    if not rows:
        return []
    return ["", "## Routing diagnostics (mean over seeds, first to last MoE layer)", "",
            "Logit spread: mean over tokens of the std over experts of the router logits (final evaluation; under the "
            "paper's rule it sets the count). Kept weight: the summed combine weight per token at the last training "
            "record (the output's scale). Dead: share of experts below 10% of uniform load; max/mean: the busiest "
            "expert's load over the mean (final evaluation).", "",
            "| variant | runs | logit spread | kept weight | dead experts | load max/mean |", "|---|---|---|---|---|---|",
            *rows]


def plot_spread(records: list[dict], variants, path: Path) -> Path | None:
    """Router logit spread by layer over training (mean over seeds), one panel per variant that logged it."""
    shown = [v for v in variants if any((r.get("k_trajectory") or {}).get("spread_L") for r in _of(records, v.name))]
    if not shown:
        return None
    plt = pyplot()
    fig, axes = panel_grid(len(shown), 4.2, 3.8, sharey=True)
    for ax, v in zip(axes, shown):
        trajs = [r["k_trajectory"] for r in _of(records, v.name) if r["k_trajectory"].get("spread_L")]
        length = min(len(t["step"]) for t in trajs)
        mean = np.mean([np.array(t["spread_L"][:length], dtype=float) for t in trajs], axis=0)
        for layer in range(mean.shape[1]):
            ax.plot(trajs[0]["step"][:length], mean[:, layer], color=plt.cm.viridis(layer / max(1, mean.shape[1] - 1)),
                    lw=1.2, label=f"layer {layer}")
        style_axes(ax, "optimizer step", "logit spread", wrapped(v.label), legend_size=0)
    axes[-1].legend(fontsize=6)
    return save_figure(fig, path)


def plot_load_heatmap(records: list[dict], variants, path: Path) -> Path | None:
    """Expert load by layer relative to uniform (final evaluation, the first seed of each variant)."""
    shown = [(v, r) for v in variants for r in _of(records, v.name)[:1]
             if (r.get("routing") or {}).get("layers") and "expert_load" in r["routing"]["layers"][0]]
    if not shown:
        return None
    plt = pyplot()
    loads = [np.array([layer["expert_load"] for layer in r["routing"]["layers"]], dtype=float) for _, r in shown]
    loads = [load * load.shape[1] for load in loads]  # relative to uniform
    vmax = max(2.0, *(float(load.max()) for load in loads))  # one scale for every panel: the one colour bar
    fig, axes = panel_grid(len(shown), 3.8, 3.6, layout="constrained")
    for ax, (v, r), load in zip(axes, shown, loads):
        image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(wrapped(f"{v.label} (seed {r['seed']})"), fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes, label="load / uniform", shrink=0.8)
    return save_figure(fig, path)


def plot_experts_per_token(records: list[dict], variants, path: Path) -> Path | None:
    """Share of tokens by the number of experts they use, per layer (final evaluation, mean over seeds), one panel
    per variant: the distribution behind Infer AE (top-k: one bar at k; the paper's rule: a spread)."""
    hists = {v.name: [np.array([layer["active_experts_hist"] for layer in r["routing"]["layers"]], dtype=float)
                      for r in _of(records, v.name)
                      if (r.get("routing") or {}).get("layers") and "active_experts_hist" in r["routing"]["layers"][0]]
             for v in variants}
    shown = [v for v in variants if hists[v.name]]
    if not shown:
        return None
    plt = pyplot()
    shares = {v.name: np.mean([h / np.maximum(h.sum(axis=1, keepdims=True), 1.0) for h in hists[v.name]], axis=0)
              for v in shown}  # [layers, 0..E experts]
    used = max(int(np.nonzero(share.max(axis=0))[0].max()) for share in shares.values())
    fig, axes = panel_grid(len(shown), 4.2, 3.6, sharey=True)
    for ax, v in zip(axes, shown):
        share = shares[v.name]
        for layer in range(share.shape[0]):
            ax.plot(range(used + 1), share[layer, :used + 1], marker="o", ms=2.5, lw=1.0,
                    color=plt.cm.viridis(layer / max(1, share.shape[0] - 1)), label=f"layer {layer}")
        style_axes(ax, "experts used by a token", "share of tokens", wrapped(v.label), legend_size=0)
    axes[-1].legend(fontsize=6)
    return save_figure(fig, path)


def _task_lines(records: list[dict], variants) -> list[str]:
    tasks = sorted({t for r in records for t in r.get("tasks", {})})
    if not tasks:
        return []
    lines = ["", "## Zero-shot tasks (acc; 95% interval over seeds, or the bootstrap interval over items for "
             "one seed)", "", "| variant | " + " | ".join(f"{t} (chance {CHANCE[t]})" if t in CHANCE else t
                                                           for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for v in variants:
        mine = _of(records, v.name)
        cells = []
        for t in tasks:
            values = [r["tasks"][t]["acc"] for r in mine if t in r.get("tasks", {})]
            stat = t_interval(values)
            if stat["n"] == 1:
                ci = mine[0].get("task_ci", {}).get(t, {}).get("acc")
                cells.append(f"{stat['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}] (items)" if ci else ""))
            else:
                cells.append(fmt_interval(stat, ".3f"))
        lines.append(f"| {v.label} | " + " | ".join(cells) + " |")
    return lines


def write_study_report(study, records: list[dict], out_dir: Path, planned: int) -> Path:
    """report.md and its plots into `out_dir`; returns report.md."""
    out_dir = Path(out_dir)
    variants = [v for v in study.variants if _of(records, v.name)]
    frontier = plot_frontier_ae(records, variants, out_dir / "frontier_ae.png")
    plots = [("Frontier: loss vs Train AE and Infer AE", frontier)]
    for caption, fn, name in (("Allocation by depth", plot_depth, "depth.png"),
                              ("k_l trajectories", plot_k_trajectories, "k_trajectories.png"),
                              ("Budget dial", plot_dial, "dial.png"),
                              ("Router logit spread by layer", plot_spread, "logit_spread.png"),
                              ("Expert load by layer", plot_load_heatmap, "expert_load.png"),
                              ("Experts per token by layer", plot_experts_per_token, "experts_per_token.png")):
        path = fn(records, variants, out_dir / name)
        if path is not None:
            plots.append((caption, path))
    path = out_dir / "report.md"
    atomic_write_text(path, study_report_markdown(study, records, plots, planned))
    return path
