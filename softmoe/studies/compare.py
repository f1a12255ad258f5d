"""`softmoe compare --study configs/studies/<name>.yaml`: train, evaluate and compare variants over seeds.

A study file:

    name: small                       # runs go to <out_dir>/<name>-<variant>-s<seed>/
    base: configs/small/softmoe.yaml  # the preset every variant starts from (relative to the repo root)
    out_dir: runs/studies/small
    seeds: [0, 1, 2]                  # sets train.seed and data.seed: init and batch order
    overrides: {train.progress: false}            # optional, applied to every variant
    reference: topk-k2                # optional: a variant every other is compared with, paired by seed
    references: [topk-k2, topk-k3]    # optional instead: several, each gets a paired-difference column
    summaries: docs/results/small     # optional: committable per-run summaries (<dir>/runs/<run>.json) and
                                      # the study report (<dir>/report.md); see softmoe/studies/summaries.py
    claims: {top2: topk-k2, learned: softmoe-K1.5}  # optional: roles for the paper-claims table (study_report.py)
    paper: {margin: 0.02, best_margin: 0.0, accuracy_margin: 0.01, late_share: 0.5, numbers: {...}}
                                      # with claims: the paper's numbers and the verdict margins (PaperClaims)
    eval: {splits: [val], max_batches: null}      # optional EvalSettings fields (no budgets)
    # eval may name zero-shot tasks (and a per-task limit): tasks: [piqa, arc_easy], limit: 500
    variants:
      - name: topk-k1
        overrides: {model.router: topk, model.k: 1}
      - name: ablation
        overrides: {model.router_options.alpha: 0.3}
        seeds: [0]                    # optional: a subset of the study's seeds (default: all of them)
        dial: [1, 1.5, 2, 3]          # optional (learned-budget models): evaluate at these global budgets K'

Every (variant, seed) sees the same data and the same number of training tokens (checked). A finished
run is reused, an interrupted one resumes (`softmoe.train.runs.train_or_reuse`), and a run's evaluation
is cached in `<run_dir>/eval/eval.json`. With `summaries`, a run whose summary is committed is not trained
again (its summary must match the planned config), `--next N` trains only the next N missing runs, and
`--jobs 2` trains two runs side by side with one thread each. The study writes `results.json`, `results.md`
and plots into its out_dir: the frontier (validation loss vs realized mean active experts), the per-layer allocation of
the SoftMoE runs, and the loss curves; with zero-shot tasks, a table of their accuracies over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from softmoe.common.atomic import atomic_write_json, atomic_write_text
from softmoe.common.checks import check_int
from softmoe.data.io import read_json
from softmoe.eval.evaluate import EvalSettings, evaluate_checkpoint, write_eval
from softmoe.eval.plots import pyplot, save_figure, style_axes
from softmoe.studies.study_report import CLAIM_ROLES, PaperClaims, write_study_report
from softmoe.studies.summaries import (build_summary, check_revisions, check_summary, load_summary, record_of,
                                    summary_path, write_summary)
from softmoe.routing import ROUTERS, router_class
from softmoe.train.checkpoint import latest_good_checkpoint
from softmoe.train.config import RunConfig, load_run_config
from softmoe.train.metrics import read_metrics
from softmoe.train.runs import is_finished, prepared_dataset_dir, train_or_reuse

__all__ = ["PlannedRun", "Study", "load_study", "plan_runs", "run_one", "run_study"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STUDY_KEYS = {"name", "base", "out_dir", "seeds", "overrides", "eval", "variants", "description", "reference",
               "references", "summaries", "claims", "paper", "preregistration", "pinned_revision"}
METRICS = ("loss", "perplexity", "bits_per_byte", "active_experts_mean", "train_ae", "expert_flops_per_token",
           "tokens_per_sec")
TASK_METRICS = ("n", "acc", "acc_norm", "perplexity", "active_experts_mean")  # per zero-shot task and run


@dataclass(frozen=True)
class Variant:
    name: str  # short id, used in run names
    overrides: tuple[str, ...]  # `section.key=value` strings on top of the study's overrides
    label: str  # legend / table label
    seeds: tuple[int, ...] | None = None  # the study seeds this variant runs with; None = all
    dial: tuple[float, ...] = ()  # budget dial K' values evaluated after training (learned-budget models)
    exploratory: bool = False  # added after the pre-registration: reported, never part of a registered verdict


@dataclass(frozen=True)
class Study:
    """A parsed study file (see the module docstring)."""

    name: str
    base: Path
    out_dir: Path
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    evaluation: EvalSettings  # the `eval:` section
    variants: tuple[Variant, ...]
    path: Path
    reference: str | None = None  # variant name: the others' val loss minus its, paired by seed
    references: tuple[str, ...] = ()  # every paired-difference reference (the first is `reference`)
    summaries: Path | None = None  # committable per-run summaries and the study report
    claims: tuple[tuple[str, str], ...] = ()  # (role, variant) pairs for the paper-claims table
    paper: PaperClaims | None = None  # the paper's numbers and the verdict margins the claims table reads
    # The pre-registered protocol (metrics, margins, verdict rules, the paper's reference numbers), as written in
    # the study file before its first run; the report reads it, code holds none of it.
    preregistration: dict | None = None
    pinned_revision: bool = False  # every run on one clean commit: the report refuses local edits too


@dataclass(frozen=True)
class PlannedRun:
    variant: Variant
    seed: int
    config: RunConfig

    @property
    def tokens(self) -> int:
        t, d = self.config.train, self.config.data
        return t.steps * t.grad_accum * d.batch_size * d.seq_len


# --------------------------------------------------------------------------------------------
# Study file -> planned runs
# --------------------------------------------------------------------------------------------


def _overrides(raw, where: str) -> tuple[str, ...]:
    """A {dotted.key: value} mapping -> `key=value` strings (values as JSON, which YAML reads back)."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ValueError(f"{where}={raw!r} must be a mapping of section.key: value")
    return tuple(f"{key}={json.dumps(value)}" for key, value in raw.items())


def _resolve(path: str, where: str) -> Path:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}={path!r} must be a path string")
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def _check_seeds(seeds, where: str) -> tuple[int, ...]:
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ValueError(f"{where}={seeds!r} must be a non-empty list of distinct ints >= 0")
    return tuple(seeds)


def _variants(raw, study_seeds: tuple[int, ...]) -> tuple[Variant, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"variants={raw!r} must be a non-empty list of {{name, overrides}}")
    variants = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) - {"name", "overrides", "label", "seeds", "dial", "exploratory"}:
            raise ValueError(f"variants[{i}]={item!r} must be a mapping with name, overrides and optional "
                             "label, seeds, dial and exploratory")
        if not isinstance(item.get("exploratory", False), bool):
            raise ValueError(f"variants[{i}].exploratory={item['exploratory']!r} must be true or false")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"variants[{i}].name={name!r} must be a non-empty name of letters, digits, _ . -")
        seeds = None
        if "seeds" in item:
            seeds = _check_seeds(item["seeds"], f"variants[{i}].seeds")
            if set(seeds) - set(study_seeds):
                raise ValueError(f"variants[{i}].seeds={list(seeds)} must be a subset of the study's seeds "
                                 f"{list(study_seeds)}")
        dial = item.get("dial", [])
        if (not isinstance(dial, list) or len(set(dial)) != len(dial)
                or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0 for b in dial)):
            raise ValueError(f"variants[{i}].dial={dial!r} must be a list of distinct budgets K' > 0")
        label = str(item.get("label", name)) + (" [exploratory]" if item.get("exploratory", False) else "")
        variants.append(Variant(name, _overrides(item.get("overrides"), f"variants[{i}].overrides"),
                                label, seeds, tuple(float(b) for b in dial), item.get("exploratory", False)))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variants: names {names} must be distinct")
    return tuple(variants)


def load_study(path: str | Path, out_dir: str | Path | None = None, summaries: str | Path | None = None) -> Study:
    """Parse and check a study file; `out_dir` and `summaries` override the file's."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study={str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"study={str(path)!r} must be a YAML mapping, got {type(raw).__name__}")
    if set(raw) - _STUDY_KEYS:
        raise ValueError(f"study {path}: unknown keys {sorted(set(raw) - _STUDY_KEYS)}; valid keys: "
                         f"{sorted(_STUDY_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name={name!r} must be a non-empty name of letters, digits, _ . -")
    seeds = _check_seeds(raw.get("seeds", [0]), "seeds")
    eval_raw = raw.get("eval") or {}
    if not isinstance(eval_raw, dict) or "budgets" in eval_raw:
        raise ValueError(f"eval={eval_raw!r} must be a mapping of EvalSettings fields (the budget dial "
                         "is run with `softmoe eval --budget`)")
    try:
        settings = EvalSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in eval_raw.items()})
    except TypeError as err:
        raise ValueError(f"eval={eval_raw!r}: {err}") from None
    if out_dir is None:
        out_dir = _resolve(raw.get("out_dir", f"runs/studies/{name}"), "out_dir")
    variants = _variants(raw.get("variants"), seeds)
    names = [v.name for v in variants]
    reference = raw.get("reference")
    if reference is not None and reference not in names:
        raise ValueError(f"reference={reference!r} must name one of the variants {names}")
    references = raw.get("references", [] if reference is None else [reference])
    if (not isinstance(references, list) or any(r not in names for r in references)
            or len(set(references)) != len(references)):
        raise ValueError(f"references={references!r} must be a list of distinct variant names from {names}")
    if reference is not None and references[:1] != [reference]:
        raise ValueError(f"reference={reference!r} and references={references!r}: give one of them (or the same "
                         "first name)")
    claims = raw.get("claims") or {}
    if not isinstance(claims, dict) or any(v not in names for v in claims.values()) or set(claims) - CLAIM_ROLES:
        raise ValueError(f"claims={claims!r} must map roles from {sorted(CLAIM_ROLES)} to variant names from {names}")
    if claims and raw.get("paper") is None:
        raise ValueError("claims: need the paper's numbers and the verdict margins in a `paper:` block")
    paper = None if raw.get("paper") is None else PaperClaims.from_mapping(raw["paper"])
    summaries = raw.get("summaries") if summaries is None else str(summaries)
    preregistration = raw.get("preregistration")
    if preregistration is not None and not isinstance(preregistration, dict):
        raise ValueError(f"preregistration={preregistration!r} must be a mapping (the study's registered protocol)")
    if not isinstance(raw.get("pinned_revision", False), bool):
        raise ValueError(f"pinned_revision={raw['pinned_revision']!r} must be true or false")
    return Study(name=name, base=_resolve(raw.get("base"), "base"), out_dir=Path(out_dir),
                 seeds=seeds, overrides=_overrides(raw.get("overrides"), "overrides"), evaluation=settings,
                 variants=variants, path=path, reference=references[0] if references else None,
                 references=tuple(references), claims=tuple(claims.items()), paper=paper,
                 summaries=None if summaries is None else _resolve(summaries, "summaries"),
                 preregistration=preregistration, pinned_revision=raw.get("pinned_revision", False))


def plan_runs(study: Study, extra_overrides: tuple[str, ...] = ()) -> list[PlannedRun]:
    """Every (variant, seed) config, seed-major (all variants of seed 0 first, so a partial study compares);
    variants restricted to some seeds (ablations) come after the variants that run every seed.

    Raises:
        ValueError: a variant's config is invalid, or variants differ in data or training tokens.
    """
    every_seed = [(seed, v) for seed in study.seeds for v in study.variants if v.seeds is None]
    some_seeds = [(seed, v) for seed in study.seeds for v in study.variants
                  if v.seeds is not None and seed in v.seeds]
    runs = []
    for seed, variant in every_seed + some_seeds:
        placed = [f"train.out_dir={study.out_dir}", f"train.name={study.name}-{variant.name}-s{seed}",
                  f"train.seed={seed}", f"data.seed={seed}"]
        try:
            config = load_run_config(study.base, [*study.overrides, *variant.overrides, *extra_overrides, *placed])
        except (ValueError, TypeError) as err:
            raise ValueError(f"variant {variant.name!r}: {err}") from None
        runs.append(PlannedRun(variant, seed, config))
    first = runs[0]
    for run in runs[1:]:
        if run.tokens != first.tokens or dataclasses.replace(run.config.data, seed=0) != \
                dataclasses.replace(first.config.data, seed=0):
            raise ValueError(f"variant {run.variant.name!r}: trains on {run.tokens:,} tokens of {run.config.data}, "
                             f"but {first.variant.name!r} on {first.tokens:,} of {first.config.data}; a study "
                             f"compares variants on the same data and token budget")
    return runs


def _status(run: PlannedRun, summaries: Path | None = None) -> str:
    if summaries is not None and summary_path(summaries, run.config.train.name).is_file():
        return "summarised"
    if is_finished(run.config):
        return "finished (reused)"
    checkpoints = run.config.train.run_dir / "checkpoints"
    found = latest_good_checkpoint(checkpoints, lambda message: None) if checkpoints.is_dir() else None
    return f"resumes from {found.name}" if found is not None else "new"


def _describe_run(config: RunConfig) -> str:
    """What a run trains, for the plan listing: "dense", or the router and its expert count, its options
    ("cap_factor=4"), and the active-experts target when one is held ("Train AE -> 2 by threshold")."""
    m, t = config.model, config.train
    if m.ffn == "dense":
        return "dense"
    parts = [f"{m.router} {m.describe_routing()}"]
    parts += [f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
              for name, value in sorted(m.router_options.items())]
    if t.ae_target:
        parts.append(f"Train AE -> {t.ae_target:g} by {t.ae_lever}")
    return ", ".join(parts)


def describe_plan(study: Study, runs: list[PlannedRun]) -> str:
    """The --dry-run text: one line per run with its status, and the token counts."""
    lines = [f"study {study.name} ({study.path}): base {study.base}, {len(study.variants)} variants x "
             f"up to {len(study.seeds)} seeds = {len(runs)} runs into {study.out_dir}"]
    whats = [_describe_run(run.config) for run in runs]
    width = max(map(len, whats), default=0)
    for run, what in zip(runs, whats):
        lines.append(f"  {run.config.train.name:<36} {what:<{width}} {run.config.train.steps} steps  "
                     f"{_status(run, study.summaries)}")
    total = sum(run.tokens for run in runs)
    todo = sum(run.tokens for run in runs
               if _status(run, study.summaries) not in ("summarised", "finished (reused)"))
    lines.append(f"tokens: {runs[0].tokens:,} per run, {total:,} in total ({todo:,} not yet trained, upper bound)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Train + evaluate every run
# --------------------------------------------------------------------------------------------


def _cached_eval(run_dir: Path, settings: EvalSettings) -> dict | None:
    """The run's eval.json if it measured the newest checkpoint with these settings."""
    path = run_dir / "eval" / "eval.json"
    if not path.is_file():
        return None
    payload = read_json(path)
    newest = latest_good_checkpoint(run_dir / "checkpoints", lambda message: None)
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    same = all(payload["settings"].get(k) == v for k, v in wanted.items() if v is not None)
    return payload if same and newest is not None and payload["model"]["checkpoint"] == str(newest) else None


def _evaluate_run(run_dir: Path, settings: EvalSettings, progress: bool = False) -> dict:
    payload = _cached_eval(run_dir, settings)
    if payload is not None:
        print(f"{run_dir}: evaluation cached in eval/eval.json", flush=True)
        return payload
    payload, points = evaluate_checkpoint(run_dir, settings, report=lambda message: print(message, flush=True),
                                          progress=progress)
    write_eval(payload, points, run_dir / "eval")
    return payload


def _noise_ae(run: PlannedRun, run_dir: Path, batches: int = 8) -> dict:
    """Train-mode realized AE of the final checkpoint with the gate noise on and off (eval/noise.py), on the first
    `batches` validation batches; {} for a dense model or a run without gate noise."""
    m = run.config.model
    if m.ffn != "moe" or not m.router_options.get("gate_noise"):
        return {}
    from softmoe.eval.budget import calibration_batches
    from softmoe.eval.evaluate import load_corpus_split
    from softmoe.eval.noise import train_mode_active
    from softmoe.train.restore import load_model

    model, config, path = load_model(run_dir, lambda message: None)
    val = load_corpus_split(config, path, config.data.corpus, "val")
    data = calibration_batches(val.tokens, config.data.seq_len, config.data.batch_size, batches)
    on = train_mode_active(model, data, config.train.precision, noise=True)
    off = train_mode_active(model, data, config.train.precision, noise=False)
    return {"train_mode_ae_noise_on": sum(on) / len(on), "train_mode_ae_noise_off": sum(off) / len(off),
            "train_mode_ae_noise_on_per_layer": on, "train_mode_ae_noise_off_per_layer": off}


def _run_record(run: PlannedRun, run_dir: Path, payload: dict) -> dict:
    entry = payload["language_modelling"][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    m = run.config.model
    return {
        "variant": run.variant.name, "label": run.variant.label, "seed": run.seed, "run_dir": str(run_dir),
        "ffn": m.ffn, "router": m.router if m.ffn == "moe" else "dense", "k": m.k,
        "loss": entry["loss"], "perplexity": entry["perplexity"], "bits_per_byte": entry["bits_per_byte"],
        "active_experts_mean": entry["routing"]["active_experts_mean"],
        "active_experts_per_layer": [layer["active_experts_mean"] for layer in entry["routing"]["layers"]],
        "k_L": payload["model"]["k_L"], "expert_flops_per_token": entry["cost"]["expert_flops_per_token"],
        "active_params": entry["cost"]["active_params"], "tokens_per_sec": summary.get("tokens_per_sec"),
        "train_ae": summary.get("train_ae"), "train_ae_per_layer": summary.get("train_ae_per_layer"),
        "skipped_steps": summary.get("skipped_steps"),
        "expert_equivalents": _expert_equivalents(run.config, entry["cost"]["expert_flops_per_token"]),
        "causal": m.ffn != "moe" or router_class(m.router).causal,
        "granularity": m.granularity if m.ffn == "moe" else 1,
        "num_shared_experts": m.num_shared_experts if m.ffn == "moe" else 0,
        "tasks": {name: {key: result[key] for key in TASK_METRICS} for name, result in payload["tasks"].items()},
        "train_ae_last": _last_train_ae(run_dir),
        **_noise_ae(run, run_dir),
    }


def _last_train_ae(run_dir: Path) -> float | None:
    """The realized AE of the last training record (Train AE's other reading, beside the last-20% mean)."""
    rows = [r for r in read_metrics(run_dir, "train") if r.get("active_experts_mean") is not None]
    return rows[-1]["active_experts_mean"] if rows else None


def _settings(study: Study, variant: Variant) -> EvalSettings:
    """The study's evaluation, plus the variant's budget dial."""
    return dataclasses.replace(study.evaluation, budgets=variant.dial) if variant.dial else study.evaluation


def run_one(study: Study, run: PlannedRun, progress: bool = False) -> dict:
    """Train (or reuse) and evaluate one run; its compare record with curves and trajectories attached.
    With `study.summaries`, its summary is written there too (the only output that outlives the run dir)."""
    if run.config.train.threads:
        torch.set_num_threads(run.config.train.threads)  # the evaluation too, not only the Trainer
    run_dir = train_or_reuse(run.config)
    payload = _evaluate_run(run_dir, _settings(study, run.variant), progress)
    summary = build_summary(study.name, run.config.train.name, run.variant.name, run.variant.label, run.seed,
                            run.config, _run_record(run, run_dir, payload), payload, run_dir)
    if study.summaries is not None:
        path = write_summary(study.summaries, summary)
        print(f"{run.config.train.name}: summary written to {_shown(path)}", flush=True)
    return {**record_of(summary), "run_dir": str(run_dir)}


def _end_with_parent() -> None:
    """Pool-worker initializer: on Linux the worker gets SIGTERM when the `softmoe compare` process dies, so a
    killed compare never leaves runs training on its own (each worker's Trainer checkpoints and stops; the next
    compare resumes the run). Elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_one_in_worker(args: tuple) -> dict:
    """A process-pool worker: `run_one(*args)` (its output interleaves with the other worker's). Stopped because its
    compare died (the SIGTERM above; the run is checkpointed), it exits: no parent will send it more work or read
    its result, and the pool's queue would otherwise keep it waiting forever."""
    parent = os.getppid()
    try:
        return run_one(*args)
    except KeyboardInterrupt:
        if os.getppid() != parent:
            os._exit(130)
        raise


def _expert_equivalents(config: RunConfig, ffn_flops: float) -> float:
    """Realized FFN FLOPs per token in units of "coarse experts per layer" (dense model: d_ff / d_expert).

    Counts shared experts and, with granularity g, fine experts as 1/g of a coarse one (d_expert is the
    coarse width), so variants compare on one compute axis."""
    m = config.model
    return ffn_flops / (m.n_layers * 2 * 3 * m.d_model * m.d_expert)


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


def _missing(study: Study, runs: list[PlannedRun], force: bool) -> tuple[dict[str, dict], list[PlannedRun]]:
    """({run name: record} of the runs summarised with the planned config, the runs to train and evaluate).

    Without `study.summaries` nothing is summarised and a run is to do until its run dir is finished.
    A summary that is unreadable or trained with other settings than the study now plans is a ValueError,
    unless `force`: then it is dropped (and its run redone). With `force` every run is to do; summaries not redone this
    sitting still count in the results."""
    done: dict[str, dict] = {}
    for run in runs if study.summaries is not None else []:
        name = run.config.train.name
        try:
            summary = load_summary(study.summaries, name)
            if summary is not None:
                check_summary(summary, run.config, summary_path(study.summaries, name))
        except ValueError:  # unreadable, or of another config
            if not force:
                raise
            continue
        if summary is not None:
            done[name] = record_of(summary)
    if force:
        return done, list(runs)
    if study.summaries is None:
        return done, [run for run in runs if not is_finished(run.config)]
    return done, [run for run in runs if run.config.train.name not in done]


def run_study(study: Study, extra_overrides: tuple[str, ...] = (), progress: bool = False, next_runs: int | None = None,
              force: bool = False, jobs: int = 1, mixed_revisions: bool = False) -> Path:
    """Train and evaluate the study's missing runs (all, or the next `next_runs` in plan order), then write
    the results from every run there is; returns results.md.

    `progress`: bars for data preparation and evaluation on a terminal (training's is `train.progress`).
    `force`: ignore existing summaries (their runs are evaluated and summarised again; a finished run dir
    is reused, so pass a new out_dir to retrain). `jobs` > 1: that many runs at once, each in its own
    process with one thread (train.threads=1). Runs not trained in this sitting and not summarised are
    left out of the results (a study in progress). The results refuse runs of different code revisions (and,
    for a study with `pinned_revision`, runs with local edits) unless `mixed_revisions`."""
    check_int("jobs", jobs, 1)
    check_int("next_runs", next_runs, 0, allow_none=True)
    overrides = tuple(extra_overrides) + (("train.threads=1",) if jobs > 1 else ())
    runs = plan_runs(study, overrides)
    done, missing = _missing(study, runs, force)
    todo = missing if next_runs is None else missing[:next_runs]
    print(f"study {study.name}: {len(runs)} runs planned, {len(done)} summarised, {len(missing)} "
          f"{'to redo (--force)' if force else 'missing'}; running {len(todo)} now"
          + (f", {jobs} at a time" if jobs > 1 and todo else ""), flush=True)
    reused = [run for run in runs if study.summaries is None and run not in missing]
    if todo:
        prepared_dataset_dir(runs[0].config.data, progress)  # fetch/prepare once, before any training
    records = dict(done)
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_end_with_parent) as pool:
            for run, record in zip(todo, pool.map(_run_one_in_worker, [(study, run, False) for run in todo])):
                records[run.config.train.name] = record
    else:
        for i, run in enumerate(todo, 1):
            print(f"== [{i}/{len(todo)}] {run.config.train.name} ==", flush=True)
            records[run.config.train.name] = run_one(study, run, progress)
    for run in reused:  # finished run dirs of a study without summaries: cached evaluations
        records[run.config.train.name] = run_one(study, run, progress)
    ordered = [records[run.config.train.name] for run in runs if run.config.train.name in records]
    if not ordered:
        raise ValueError(f"study {study.name}: no run is trained or summarised yet; run it without --next 0")
    return write_results(study, runs, ordered, mixed_revisions)


# --------------------------------------------------------------------------------------------
# Results: json, markdown, plots
# --------------------------------------------------------------------------------------------

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


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it (stable across checkouts)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _pm(stat: dict, spec: str, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "-"
    text = format(stat["mean"] / scale, spec)
    return text if stat["std"] is None else f"{text} ± {format(stat['std'] / scale, spec)}"


def results_markdown(study: Study, runs: list[PlannedRun], rows: list[dict], plots: list[tuple[str, Path]]) -> str:
    c, limit = runs[0].config, study.evaluation.max_batches
    ref = None if study.reference is None else next(v.label for v in study.variants if v.name == study.reference)
    head = [f"# Study `{study.name}`", "",
            f"Study file `{_shown(study.path)}`; base preset `{_shown(study.base)}`. "
            f"Command: `softmoe compare --study {_shown(study.path)}`.",
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
        print(f"study report written: {_shown(report)}", flush=True)
    return out / "results.md"
