"""Committable run summaries of a study: one small JSON per finished run, so a study spans sittings.

A study with a `summaries:` directory (e.g. docs/results/<study>) gets, for every finished and evaluated
run, `<summaries>/runs/<run name>.json` holding everything its report needs and no checkpoint:

    {"format": 1, "study", "run", "variant", "label", "seed",
     "config":   the run's resolved config (every default spelled out),
     "record":   the compare record (val loss, perplexity, bits per byte, Train/Infer AE overall and per
                 layer, learned k_l, expert FLOPs, zero-shot metrics, ...),
     "task_ci":  {task: {metric: [low, high]}}, the evaluation's bootstrap 95% intervals,
     "curves":   {"train": {"step", "loss", "active_experts"}, "val": {"step", "loss"}} at the log steps,
     "k_trajectory": {"step": [...], "k_L": [[k_l per layer], ...], "active_L": [[realized per layer], ...],
                      "threshold": [the SoftMoE routers' relative threshold, ...]}
                 (train records; k_L absent for routers without a learned budget, threshold for routers without
                 the relative truncation and in summaries written before it was logged),
                 and, where the run logged them, the routing diagnostics per layer: "spread_L" (logit spread),
                 "weight_L" (summed combine weight), "dead_L" (dead-expert fraction), "load_peak_L" (max/mean load),
     "dial":     the budget dial's points (K', loss, realized AE per layer) or null,
     "routing":  the final evaluation's routing per layer (Infer AE, histogram, expert load, spread, dead experts),
     "revision": {"commits", "dirty", "sessions"}: the code revision of every training session of the run,
     "machine":  where it ran (platform, torch, threads, tok/s)}

`softmoe compare` reads these before training anything: a planned run whose summary exists is not trained
again (unless --force), and a summary written with other trajectory settings than the study now plans is
refused with the keys that differ (a study never mixes configs). Numbers are rounded to 6 significant
digits: a summary is a few tens of kB.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from softmoe.data.io import atomic_write_text, read_json
from softmoe.train.config import RunConfig
from softmoe.train.loop import read_revisions
from softmoe.train.metrics import read_metrics
from softmoe.train.rundir import resolved_dict, trajectory_diff

__all__ = ["FORMAT", "summary_path", "build_summary", "write_summary", "load_summary", "check_summary",
           "check_revisions", "record_of", "revision_of", "trajectories"]

FORMAT = 1


def summary_path(summaries: Path, run_name: str) -> Path:
    return Path(summaries) / "runs" / f"{run_name}.json"


def _round(value, digits: int = 6):
    """Floats to `digits` significant digits, recursively (ints, strings, None unchanged)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    return value


def trajectories(run_dir: Path) -> tuple[dict, dict]:
    """(curves, k_trajectory) of a run from its metrics.jsonl (see the module docstring)."""
    train = [r for r in read_metrics(run_dir, "train") if isinstance(r.get("step"), int)]
    val = [r for r in read_metrics(run_dir, "val") if isinstance(r.get("loss"), (int, float))]
    curves = {"train": {"step": [r["step"] for r in train], "loss": [r.get("loss") for r in train],
                        "active_experts": [r.get("active_experts_mean") for r in train]},
              "val": {"step": [r["step"] for r in val], "loss": [r["loss"] for r in val]}}
    layered = [r for r in train if r.get("layers")]
    k_traj = {"step": [r["step"] for r in layered],
              "active_L": [[layer.get("active_experts_mean") for layer in r["layers"]] for r in layered]}
    for key, name in (("logit_spread", "spread_L"), ("weight_sum_mean", "weight_L"), ("dead_fraction", "dead_L"),
                      ("load_max_over_mean", "load_peak_L")):  # routing diagnostics, where the run logged them
        if layered and all(key in layer for layer in layered[0]["layers"]):
            k_traj[name] = [[layer.get(key) for layer in r["layers"]] for r in layered]
    if layered and all("k" in layer for layer in layered[0]["layers"]):
        k_traj["k_L"] = [[layer.get("k") for layer in r["layers"]] for r in layered]
    if layered and all("threshold" in layer for layer in layered[0]["layers"]):
        k_traj["threshold"] = [r["layers"][0].get("threshold") for r in layered]  # the controller's: one for all
        k_traj["threshold_L"] = [[layer.get("threshold") for layer in r["layers"]] for r in layered]  # realized
    return curves, k_traj


def revision_of(run_dir: Path) -> dict:
    """{"commits": the distinct commits that trained the run, "dirty": any session with local edits,
    "sessions": [{"step", "commit", "dirty", "version"} per training session]} (empty lists when not recorded)."""
    sessions = read_revisions(run_dir)
    commits = sorted({s.get("commit") for s in sessions if s.get("commit")})
    return {"commits": commits, "dirty": any(s.get("dirty") for s in sessions), "sessions": sessions}


def check_revisions(runs: list[tuple[str, dict | None]], allow_dirty: bool = True) -> str | None:
    """Why these runs mix code revisions (None when they do not): runs trained by different commits (a run trained
    across commits included), some runs with a recorded revision and some without, or (`allow_dirty` False)
    local edits. `runs`: (run name, its summary's "revision" or None) pairs."""
    recorded = [(name, rev) for name, rev in runs if (rev or {}).get("commits")]
    if not recorded:
        return None
    if len(recorded) < len(runs):
        missing = sorted(str(name) for name, rev in runs if not (rev or {}).get("commits"))
        return f"{len(missing)} run(s) record no code revision ({', '.join(missing[:4])})"
    commits = sorted({c for _, rev in recorded for c in rev["commits"]})
    if len(commits) > 1:
        return f"the runs were trained by {len(commits)} commits ({', '.join(c[:10] for c in commits[:4])})"
    dirty = sorted(str(name) for name, rev in recorded if rev.get("dirty"))
    if dirty and not allow_dirty:
        return f"{len(dirty)} run(s) were trained with local edits ({', '.join(dirty[:4])})"
    return None


def _task_intervals(payload: dict) -> dict:
    out = {}
    for name, result in payload.get("tasks", {}).items():
        out[name] = {key[:-3]: list(result[key]) for key in result if key.endswith("_ci") and result[key] is not None}
    return out


def build_summary(study: str, run_name: str, variant: str, label: str, seed: int, config: RunConfig,
                  record: dict, payload: dict, run_dir: Path) -> dict:
    """The summary of one finished, evaluated run (`record` from compare, `payload` its eval.json)."""
    curves, k_traj = trajectories(run_dir)
    if record.get("k_L") is None:  # a router without a learned budget logs its fixed k per layer: not a trajectory
        k_traj.pop("k_L", None)
    dial = payload.get("budget_dial")
    run_summary = read_json(Path(run_dir) / "summary.json")
    record = {k: v for k, v in record.items() if k != "run_dir"}
    return _round({
        "format": FORMAT, "study": study, "run": run_name, "variant": variant, "label": label, "seed": seed,
        "config": resolved_dict(config), "record": record, "task_ci": _task_intervals(payload),
        "curves": curves, "k_trajectory": k_traj, "dial": None if not dial else dial["points"],
        "routing": payload["language_modelling"][0]["routing"] if payload.get("language_modelling") else None,
        "revision": revision_of(run_dir),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "torch": torch.__version__,
                    "threads": config.train.threads, "tokens_per_sec": run_summary.get("tokens_per_sec"),
                    "skipped_steps": run_summary.get("skipped_steps")},
    })


def write_summary(summaries: Path, summary: dict) -> Path:
    """One line of sorted, compact JSON per section (small, and a diff shows which section changed)."""
    path = summary_path(summaries, summary["run"])
    lines = [f"{json.dumps(key)}: {json.dumps(summary[key], sort_keys=True, separators=(',', ':'))}"
             for key in sorted(summary)]
    atomic_write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")
    return path


# What `record_of` and `check_summary` read (the other sections are optional).
REQUIRED_KEYS = ("run", "config", "record", "curves", "k_trajectory")


def load_summary(summaries: Path, run_name: str) -> dict | None:
    """The run's summary, None when there is none; ValueError when it is unreadable or of another format."""
    path = summary_path(summaries, run_name)
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable run summary ({err}); delete it or pass --force") from None
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise ValueError(f"{path}: format {summary.get('format') if isinstance(summary, dict) else None!r}, "
                         f"expected {FORMAT}; delete it or pass --force")
    missing = [key for key in REQUIRED_KEYS if not isinstance(summary.get(key), str if key == "run" else dict)]
    if missing:
        raise ValueError(f"{path}: the run summary lacks {missing}; delete it or pass --force")
    return summary


def check_summary(summary: dict, config: RunConfig, path: Path) -> None:
    """ValueError naming the keys when `summary` was trained with other trajectory settings than `config`."""
    try:
        changed = trajectory_diff(summary["config"], config)
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: unreadable config in the run summary ({err})") from None
    if changed:
        shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
        raise ValueError(f"{path} was trained with other settings than the study now plans ({shown}); a study "
                         f"does not mix configs: restore the study file, use a new study name, or pass --force "
                         f"to retrain this run")


def record_of(summary: dict) -> dict:
    """The compare record of a summary, with its curves, trajectories, intervals and dial attached."""
    return {**summary["record"], "run_dir": None, "curves": summary["curves"],
            "k_trajectory": summary["k_trajectory"], "task_ci": summary.get("task_ci", {}),
            "dial": summary.get("dial"), "summary_run": summary["run"], "revision": summary.get("revision"),
            "routing": summary.get("routing")}
