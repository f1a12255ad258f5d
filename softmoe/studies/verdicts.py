"""A pre-registered study's verdicts, computed from its run summaries by the rules it registered.

A study file's `preregistration.verdicts` states each rule in words before the first run. Its transcription,
`<study>.analysis.yaml` beside the study file, restates each rule as checks of a few kinds with the rule's own
numbers (tests/unit/eval/test_verdicts.py checks that every number and variant of a check appears in the
registered text, so the transcription cannot drift from the registration). This module holds the kinds, not the
numbers:

    paired_loss   variant's val loss minus reference's, paired by seed: "better" if the 95% interval's upper bound
                  < 0, "comparable" if < +margin, "worse" if the lower bound > +margin, else "not resolved"
    below         the interval of a metric against a value: "fewer" (upper < value), "not fewer" (lower >= value)
    inside        the interval of a metric against a range: "as the paper" (inside), "below", "above", "overlapping"
    scale         a paired difference's interval against 0: "output scale matters" if it excludes 0
    same_claim    the paired_loss verdict of `variant` vs `reference` and of `like` vs `reference` on the same
                  seeds: "about routing" if they agree, else "about output scale"
    gap_noise     per run gap = Infer AE - Train AE (last record) and noise effect = train-mode AE with the gate
                  noise on minus off: "the noise explains the gap", "no gap" or "not the noise"
    late_share    share of a per-layer quantity held by the last `last` layers: "as the paper", "uniform",
                  "early" or "later, less than the paper"
    held          the realized-count budget: every layer's Train AE within layer_tol of its final k_l and the
                  mean Train AE within mean_tol of the budget, in every seed
    frontier      each variant's loss minus the top-k frontier (piecewise-linear in AE through the top-k variants'
                  losses at the same seed; with `through: mean`, through their mean losses over the check's seeds)
                  at its own Infer AE: "below", "on" (< +margin) or "above"
    divergence    the first pair's recipe check: a skipped step, or a logged train loss above ratio x its minimum
                  so far after `after_step`
    joint_claim   the paper's claim from two earlier verdicts: "holds" if `loss_rule`'s is comparable or better
                  and `count_rule`'s is fewer, "does not hold" if worse or not fewer, else "not resolved"

Every interval is the 95% Student-t interval over seeds (study_report.t_interval). A verdict computed on fewer
seeds than the check registers is marked provisional; one without any shared seed is "not yet measured".

The transcription's optional `exploratory:` section (name -> {why, checks}) holds readings added after the
verdicts were computed; verdicts.md shows them apart, labelled as not registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from softmoe.common.atomic import atomic_write_text
from softmoe.studies.study_report import fmt_interval, paired, t_interval

__all__ = ["Verdict", "load_analysis", "analysis_path", "evaluate_rules", "evaluate_exploratory", "verdicts_markdown",
           "write_verdicts", "KINDS"]

# Record fields each metric name reads (records: softmoe.studies.summaries.record_of).
METRICS = {"loss": "loss", "infer_ae": "active_experts_mean", "train_ae": "train_ae", "train_ae_last": "train_ae_last"}


@dataclass(frozen=True)
class Verdict:
    rule: str          # the registered rule's name
    check: str         # what was compared, in words
    measured: str      # the numbers behind the verdict
    verdict: str       # the rule's outcome
    seeds: int         # seeds the verdict used
    registered: int    # seeds the check registers (more than `seeds`: provisional)

    @property
    def provisional(self) -> bool:
        return 0 < self.seeds < self.registered


def analysis_path(study_path: Path) -> Path:
    """`configs/studies/x.yaml` -> `configs/studies/x.analysis.yaml`."""
    return study_path.with_name(study_path.stem + ".analysis.yaml")


def load_analysis(path: Path) -> dict:
    """The transcription: {"rules": {rule: [check, ...]}, "divergence": [check], "exploratory": {name: {"why",
    "checks"}}}; ValueError naming the part that is malformed (every check needs a known kind)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("rules"), dict):
        raise ValueError(f"{path}: must be a mapping with `rules:` (rule name -> list of checks)")
    exploratory = raw.get("exploratory") or {}
    if not isinstance(exploratory, dict):
        raise ValueError(f"{path}: exploratory must be a mapping (reading name -> why, checks)")
    named = {f"rules.{rule}": checks for rule, checks in {**raw["rules"], "divergence": raw.get("divergence", [])}.items()}
    for name, entry in exploratory.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("why"), str):
            raise ValueError(f"{path}: exploratory.{name} must be a mapping with `why:` (text) and `checks:`")
        named[f"exploratory.{name}.checks"] = entry.get("checks")
    known = KINDS.keys() | COMBINED.keys()
    for where, checks in named.items():
        if not isinstance(checks, list) or not all(isinstance(c, dict) and c.get("kind") in known for c in checks):
            raise ValueError(f"{path}: {where} must be a list of checks, each with a kind from {sorted(known)}")
        for c in checks:
            if c["kind"] == "frontier" and c.get("through", "seed") not in ("seed", "mean"):
                raise ValueError(f"{path}: {where}: a frontier check's through must be seed or mean, not "
                                 f"{c['through']!r}")
    return raw


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _runs(records: list[dict], variant: str, seeds=None) -> list[dict]:
    return [r for r in _seeded(records, seeds) if r["variant"] == variant]


def _seeded(records: list[dict], seeds) -> list[dict]:
    return [r for r in records if seeds is None or r["seed"] in seeds]


def _registered(c: dict, planned: dict | None, *variants: str) -> int:
    """Seeds a check registers for a comparison of `variants`: its own `seeds`, else the seeds the study plans
    for every one of them (`planned`: {variant: seeds})."""
    if c.get("seeds"):
        return len(c["seeds"])
    seed_sets = [set((planned or {}).get(v, ())) for v in variants]
    return len(set.intersection(*seed_sets)) if seed_sets else 0


def _unresolved(stat: dict | None) -> str | None:
    if stat is None or stat["mean"] is None:
        return "not yet measured"
    if stat["low"] is None:
        return "not resolved (one seed)"
    return None


def loss_claim(delta: dict | None, margin: float) -> str:
    """The registered claim_comparable_loss rule on a paired-difference interval."""
    early = _unresolved(delta)
    if early:
        return early
    if delta["high"] < 0:
        return "better"
    if delta["high"] < margin:
        return "comparable"
    if delta["low"] > margin:
        return "worse"
    return "not resolved"


def late_share(per_layer: list[float], last: int) -> float:
    return float(sum(per_layer[-last:]) / sum(per_layer))


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float, bool]:
    """Piecewise-linear y(x) through `points` (sorted by x); outside their range, the end segment extended.
    Returns (y, extrapolated)."""
    points = sorted(points)
    if len(points) < 2:
        raise ValueError("a frontier needs at least two points")
    i = 0
    while i < len(points) - 2 and x > points[i + 1][0]:
        i += 1
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0), not points[0][0] <= x <= points[-1][0]


# --------------------------------------------------------------------------------------------
# The kinds
# --------------------------------------------------------------------------------------------


def _paired_loss(rule, c, records, margin, planned=None):
    seeds = c.get("seeds")
    d = paired(_seeded(records, seeds), c["variant"], c["reference"])
    stat = d or t_interval([])
    return [Verdict(rule, f"{c['variant']} - {c['reference']}, val loss", fmt_interval(stat, ".4f", True),
                    loss_claim(d, margin), stat["n"], _registered(c, planned, c["variant"], c["reference"]))]


def _below(rule, c, records, margin, planned=None):
    stat = t_interval([r.get(METRICS[c["metric"]]) for r in _runs(records, c["variant"], c.get("seeds"))])
    verdict = _unresolved(stat) or ("fewer" if stat["high"] < c["value"] else
                                    "not fewer" if stat["low"] >= c["value"] else "not resolved")
    return [Verdict(rule, f"{c['variant']} {c['metric']} vs {c['value']}", fmt_interval(stat, ".3f"), verdict,
                    stat["n"], _registered(c, planned, c["variant"]))]


def _inside(rule, c, records, margin, planned=None):
    lo, hi = c["range"]
    stat = t_interval([r.get(METRICS[c["metric"]]) for r in _runs(records, c["variant"], c.get("seeds"))])
    verdict = _unresolved(stat) or ("as the paper" if lo <= stat["low"] and stat["high"] <= hi else
                                    "below" if stat["high"] < lo else "above" if stat["low"] > hi else "overlapping")
    return [Verdict(rule, f"{c['variant']} {c['metric']} in [{lo}, {hi}]", fmt_interval(stat, ".3f"), verdict,
                    stat["n"], _registered(c, planned, c["variant"]))]


def _scale(rule, c, records, margin, planned=None):
    seeds = c.get("seeds")
    d = paired(_seeded(records, seeds), c["variant"], c["reference"])
    stat = d or t_interval([])
    verdict = _unresolved(d) or ("output scale matters" if stat["low"] > 0 or stat["high"] < 0
                                 else "output scale does not matter (interval contains 0)")
    return [Verdict(rule, f"{c['variant']} - {c['reference']}, val loss", fmt_interval(stat, ".4f", True),
                    verdict, stat["n"], _registered(c, planned, c["variant"], c["reference"]))]


def _same_claim(rule, c, records, margin, planned=None):
    seeds = c.get("seeds")
    mine = paired(_seeded(records, seeds), c["variant"], c["reference"])
    like = paired(_seeded(records, seeds), c["like"], c["reference"])
    a, b = loss_claim(mine, margin), loss_claim(like, margin)
    unresolved = [v for v in (a, b) if v.startswith("not yet") or "one seed" in v]
    verdict = unresolved[0] if unresolved else "about routing" if a == b else "about output scale"
    n = min((d or {"n": 0})["n"] for d in (mine, like))
    return [Verdict(rule, f"{c['variant']} vs {c['reference']} ({a}) against {c['like']} vs {c['reference']} ({b})",
                    f"{fmt_interval(mine, '.4f', True)}; "
                    f"{fmt_interval(like, '.4f', True)}", verdict, n, _registered(c, planned, c["variant"], c["like"], c["reference"]))]


def _gap_noise(rule, c, records, margin, planned=None):
    out = []
    for variant in c["variants"]:
        runs = [r for r in _runs(records, variant, c.get("seeds"))
                if None not in (r.get("active_experts_mean"), r.get("train_ae_last"))]
        gaps = [r["active_experts_mean"] - r["train_ae_last"] for r in runs]
        noise = [r.get("train_mode_ae_noise_on") - r.get("train_mode_ae_noise_off") for r in runs
                 if None not in (r.get("train_mode_ae_noise_on"), r.get("train_mode_ae_noise_off"))]
        gap, both = t_interval(gaps), t_interval([g + n for g, n in zip(gaps, noise)] if len(noise) == len(gaps)
                                                 else [])
        verdict = _unresolved(gap) or (
            "no gap" if gap["low"] <= 0 <= gap["high"] else
            "the noise explains the gap" if both["low"] is not None and both["low"] <= 0 <= both["high"]
            else "not the noise")
        direction = "" if gap["mean"] is None else (" (Infer > Train, the paper's direction)" if gap["mean"] > 0
                                                    else " (Infer < Train)")
        out.append(Verdict(rule, f"{variant}: gap Infer AE - Train AE (last), and gap + noise effect",
                           f"gap {fmt_interval(gap, '.3f', True)}{direction}; gap + noise "
                           f"{fmt_interval(both, '.3f', True)}", verdict, gap["n"], _registered(c, planned, variant)))
    return out


def _late_share(rule, c, records, margin, planned=None):
    field, last, uniform, halfway = c["of"], c["last"], c["uniform"], c["paper_halfway"]
    shares = [late_share(r[field], last) for r in _runs(records, c["variant"], c.get("seeds")) if r.get(field)]
    stat = t_interval(shares)
    verdict = _unresolved(stat) or (
        "as the paper" if stat["mean"] >= halfway and stat["low"] > uniform else
        "uniform" if stat["low"] <= uniform <= stat["high"] else
        "early" if stat["high"] < uniform else "later, less than the paper")
    return [Verdict(rule, f"{c['variant']}: share of {field} in the last {last} layers (uniform {uniform})",
                    fmt_interval(stat, ".3f"), verdict, stat["n"], _registered(c, planned, c["variant"]))]


def _held(rule, c, records, margin, planned=None):
    runs = [r for r in _runs(records, c["variant"], c.get("seeds")) if r.get("train_ae_per_layer") and r.get("k_L")]
    worst_layer = [max(abs(a - k) for a, k in zip(r["train_ae_per_layer"], r["k_L"])) for r in runs]
    mean_off = [abs(r["train_ae"] - c["budget"]) for r in runs]
    held = all(w <= c["layer_tol"] for w in worst_layer) and all(m <= c["mean_tol"] for m in mean_off)
    verdict = "not yet measured" if not runs else "held" if held else "not held"
    measured = ("-" if not runs else f"largest |layer Train AE - k_l| per seed {[round(w, 3) for w in worst_layer]}"
                f"; |mean Train AE - {c['budget']}| {[round(m, 3) for m in mean_off]}")
    return [Verdict(rule, f"{c['variant']}: layers within {c['layer_tol']} of k_l, mean within {c['mean_tol']} "
                    f"of {c['budget']}", measured, verdict, len(runs), _registered(c, planned, c["variant"]))]


def _frontier(rule, c, records, margin, planned=None):
    seeds, through_mean = c.get("seeds"), c.get("through") == "mean"
    topk_losses = {name: [t["loss"] for t in _runs(records, name, seeds)] for name in c["topk"]}
    mean_loss = {name: sum(losses) / len(losses) for name, losses in topk_losses.items() if losses}
    # through the means: the verdict is as provisional as the least-seeded top-k mean it rests on
    fewest_topk = min(map(len, topk_losses.values())) if through_mean else None
    out = []
    for variant in c["variants"]:
        deltas, extrapolated = [], False
        for r in _runs(records, variant, seeds):
            if through_mean:
                points = [(ae, mean_loss[name]) for name, ae in c["topk"].items() if name in mean_loss]
            else:
                points = [(ae, t["loss"]) for name, ae in c["topk"].items()
                          for t in _runs(records, name, [r["seed"]])]
            if len(points) < len(c["topk"]) or r.get("active_experts_mean") is None:
                continue
            y, outside = interpolate(points, r["active_experts_mean"])
            deltas.append(r["loss"] - y)
            extrapolated |= outside
        stat = t_interval(deltas)
        verdict = _unresolved(stat) or ("below the frontier" if stat["high"] < 0 else
                                        "on the frontier" if stat["high"] < margin else "above the frontier")
        note = " (AE outside the top-k range: frontier extended)" if extrapolated else ""
        through = " (frontier through the top-k mean losses)" if through_mean else ""
        out.append(Verdict(rule, f"{variant} - top-k frontier{through} at its Infer AE, val loss",
                           fmt_interval(stat, ".4f", True) + note, verdict,
                           stat["n"] if fewest_topk is None else min(stat["n"], fewest_topk),
                           _registered(c, planned, variant, *c["topk"])))
    return out


def _divergence(rule, c, records, margin, planned=None):
    out = []
    for variant in c["variants"]:
        runs = _runs(records, variant, [c["seed"]])
        if not runs:
            out.append(Verdict(rule, f"{variant} seed {c['seed']}", "-", "not yet measured", 0, 1))
            continue
        r = runs[0]
        train = r.get("curves", {}).get("train", {})
        worst, lowest = 0.0, float("inf")
        for step, loss in zip(train.get("step", []), train.get("loss", [])):
            if loss is None:
                continue
            if step > c["after_step"] and lowest < float("inf"):
                worst = max(worst, loss / lowest)
            lowest = min(lowest, loss)
        skipped = int(r.get("skipped_steps") or 0)
        diverged = skipped > 0 or worst > c["ratio"]
        out.append(Verdict(rule, f"{variant} seed {c['seed']}: skipped steps; largest logged loss / its minimum "
                           f"so far after step {c['after_step']}", f"{skipped}; {worst:.3f}",
                           "diverged: the study stops" if diverged else "not diverged", 1, 1))
    return out


KINDS = {"paired_loss": _paired_loss, "below": _below, "inside": _inside, "scale": _scale,
         "same_claim": _same_claim, "gap_noise": _gap_noise, "late_share": _late_share, "held": _held,
         "frontier": _frontier, "divergence": _divergence}


def _joint_claim(rule: str, c: dict, earlier: list[Verdict]) -> Verdict:
    """The paper's claim from two verdicts computed before it: `loss_rule`'s (comparable or better) and
    `count_rule`'s (fewer)."""
    (loss,) = [v for v in earlier if v.rule == c["loss_rule"]]
    (count,) = [v for v in earlier if v.rule == c["count_rule"]]
    if "not yet" in loss.verdict or "not yet" in count.verdict:
        verdict = "not yet measured"
    elif loss.verdict == "worse" or count.verdict == "not fewer":
        verdict = "the paper's claim does not hold"
    elif loss.verdict in ("comparable", "better") and count.verdict == "fewer":
        verdict = "the paper's claim holds"
    else:
        verdict = "not resolved"
    return Verdict(rule, f"{c['loss_rule']} and {c['count_rule']} together", f"{loss.verdict}; {count.verdict}",
                   verdict, min(loss.seeds, count.seeds), max(loss.registered, count.registered))


# Kinds computed from the verdicts of earlier checks, not from the records.
COMBINED = {"joint_claim": _joint_claim}


def evaluate_rules(analysis: dict, records: list[dict], margin: float,
                   planned: dict[str, tuple[int, ...]] | None = None) -> list[Verdict]:
    """Every check of the transcription on these records, in the transcription's order (divergence first).
    `planned`: {variant: the seeds the study plans for it}, what a check without `seeds` registers (a verdict on
    fewer is provisional)."""
    return _evaluate((("divergence", analysis.get("divergence", [])), *analysis["rules"].items()), records, margin,
                     planned)


def evaluate_exploratory(analysis: dict, records: list[dict], margin: float,
                         planned: dict[str, tuple[int, ...]] | None = None) -> list[Verdict]:
    """The checks of the transcription's `exploratory:` readings (not registered), by reading name."""
    entries = (analysis.get("exploratory") or {}).items()
    return _evaluate(((name, entry["checks"]) for name, entry in entries), records, margin, planned)


def _evaluate(named_checks, records: list[dict], margin: float, planned) -> list[Verdict]:
    out = []
    for rule, checks in named_checks:
        for check in checks:
            if check["kind"] in COMBINED:
                out.append(COMBINED[check["kind"]](rule, check, out))
            else:
                out += KINDS[check["kind"]](rule, check, records, margin, planned)
    return out


def _ours(records: list[dict], variant: str, read, spec: str) -> str:
    return fmt_interval(t_interval([read(r) for r in _runs(records, variant)]), spec)


def _hellaswag(record: dict) -> float | None:
    acc = record.get("tasks", {}).get("hellaswag", {}).get("acc_norm")
    return None if acc is None else 100.0 * acc


def paper_lines(paper: dict, rows: dict[str, str], records: list[dict]) -> list[str]:
    """The paper's numbers (`preregistration.paper`) beside ours for the variants `rows` maps them to."""
    columns = (("train_ae", "Train AE", lambda r: r.get("train_ae"), ".3f"),
               ("infer_ae", "Infer AE", lambda r: r.get("active_experts_mean"), ".3f"),
               ("val_loss", "val loss", lambda r: r.get("loss"), ".4f"),
               ("hellaswag", "HellaSwag acc_norm %", _hellaswag, ".1f"))
    lines = ["## The paper's numbers beside ours", "",
             "The paper's (OWT, `preregistration.paper`) and ours (mean [95% interval] (n seeds)). Losses and "
             "accuracies are on other data at another scale: compare differences between rows, not values.", "",
             "| paper's row | variant | " + " | ".join(f"{name}: paper / ours" for _, name, _, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for key, variant in rows.items():
        cells = [f"{paper[key].get(field, '-')} / {_ours(records, variant, read, spec)}"
                 for field, _, read, spec in columns]
        lines.append(f"| {key} | {variant} | " + " | ".join(cells) + " |")
    return lines + [""]


def verdicts_markdown(study, analysis: dict, records: list[dict], planned: int) -> str:
    """The registered verdicts page: each rule's registered text, then its checks (measured, verdict)."""
    registration = study.preregistration or {}
    margin = float(registration["margin"])
    registered = {**registration.get("verdicts", {}), "divergence": registration.get("divergence", "")}
    planned_seeds = {v.name: tuple(v.seeds or study.seeds) for v in study.variants}
    verdicts = evaluate_rules(analysis, records, margin, planned_seeds)
    exploratory = [v.name for v in study.variants if v.exploratory]
    lines = [f"# Study `{study.name}`: registered verdicts", "",
             f"{len(records)} of {planned} planned runs summarised. Each rule below is quoted from "
             f"`{study.path.name}` (registered {registration.get('registered', '?')}); its checks are computed by "
             f"`softmoe/studies/verdicts.py` from the transcription `{analysis_path(study.path).name}`. Intervals: 95% "
             f"Student-t over seeds; margin {margin} nats. A verdict on fewer seeds than registered is marked "
             "*provisional*: it can still change.", ""]
    if exploratory:
        lines += [f"Exploratory variants (not part of any verdict): {', '.join(exploratory)}.", ""]
    if analysis.get("paper_rows"):
        lines += paper_lines(registration.get("paper", {}), analysis["paper_rows"], records)
    for rule in dict.fromkeys(v.rule for v in verdicts):
        lines += [f"## {rule}", "", "> " + " ".join(str(registered.get(rule, "(not in the registration)")).split()),
                  ""] + _verdict_table([v for v in verdicts if v.rule == rule])
    exploratory_readings = analysis.get("exploratory") or {}
    if exploratory_readings:
        lines += ["## Exploratory readings (not registered)", "",
                  "Added to the transcription after the registered verdicts were computed; they decide nothing.", ""]
        found = evaluate_exploratory(analysis, records, margin, planned_seeds)
        for name, entry in exploratory_readings.items():
            lines += [f"### {name}", "", " ".join(entry["why"].split()), ""]
            lines += _verdict_table([v for v in found if v.rule == name])
    return "\n".join(lines)


def _verdict_table(verdicts: list[Verdict]) -> list[str]:
    lines = ["| check | measured | verdict |", "|---|---|---|"]
    for v in verdicts:
        mark = f" *(provisional: {v.seeds} of {v.registered} seeds)*" if v.provisional else ""
        lines.append(f"| {v.check} | {v.measured} | **{v.verdict}**{mark} |")
    return lines + [""]


def write_verdicts(study, records: list[dict], out_dir: Path, planned: int) -> Path | None:
    """verdicts.md into `out_dir` when the study is pre-registered and transcribed; None otherwise."""
    path = analysis_path(study.path)
    if study.preregistration is None or not path.is_file():
        return None
    out = Path(out_dir) / "verdicts.md"
    atomic_write_text(out, verdicts_markdown(study, load_analysis(path), records, planned))
    return out
