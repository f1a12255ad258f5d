"""`softmoe compare --config configs/studies/<name>.yaml`: the study file, parsed and planned into runs
(studies/run.py trains and evaluates them, studies/results.py and studies/study_report.py report them).

A study file:

    name: small                       # runs go to <out_dir>/<name>-<variant>-s<seed>/
    base: configs/small/softmoe.yaml  # the preset every variant starts from: a file (from the current directory,
                                      # else next to the study file), else the packaged preset of that name
    out_dir: runs/studies/small       # out_dir and summaries: relative to the current directory
    seeds: [0, 1, 2]                  # sets train.seed and data.seed: init and batch order
    overrides: {train.progress: false}            # optional, applied to every variant
    reference: topk-k2                # optional: a variant every other is compared with, paired by seed
    references: [topk-k2, topk-k3]    # optional instead: several, each gets a paired-difference column
    summaries: docs/results/small     # optional: committable per-run summaries (<dir>/runs/<run>.json) and
                                      # the study report (<dir>/report.md); see softmoe/studies/summaries.py
    claims: {top2: topk-k2, learned: softmoe-K1.5}  # optional: roles for the paper-claims table (study_report.py)
    paper: {margin: 0.02, best_margin: 0.0, accuracy_margin: 0.01, late_share: 0.5, numbers: {...}}
                                      # with claims: the paper's numbers and the verdict margins (PaperClaims);
                                      # without it the report has no claims table
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
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from softmoe.common.presets import find_config
from softmoe.eval.evaluate import EvalSettings
from softmoe.studies.study_report import CLAIM_ROLES, PaperClaims
from softmoe.studies.summaries import summary_path
from softmoe.train.checkpoint import latest_good_checkpoint
from softmoe.train.config import RunConfig, load_run_config
from softmoe.train.runs import is_finished

__all__ = ["PlannedRun", "Study", "Variant", "describe_plan", "load_study", "plan_runs", "shown_path"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STUDY_KEYS = {"name", "base", "out_dir", "seeds", "overrides", "eval", "variants", "description", "reference",
               "references", "summaries", "claims", "paper", "preregistration", "pinned_revision"}


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


def _path(path: str, where: str) -> Path:
    """A path of the study file, relative to the current directory like `--out` and `train.out_dir`."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}={path!r} must be a path string")
    return Path(path)


def _base(base: Path, study_path: Path) -> Path:
    """The study's base preset: `base` relative to the current directory, else next to the study file, else the
    packaged preset of that name (`find_config`)."""
    beside = study_path.parent / base
    if not base.exists() and not base.is_absolute() and beside.is_file():
        return beside
    return find_config(base)


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
    """Parse and check a study file (a file, or a packaged study such as `studies/tiny.yaml`); `out_dir` and
    `summaries` override the file's."""
    path = find_config(path)
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
        out_dir = _path(raw.get("out_dir", f"runs/studies/{name}"), "out_dir")
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
    # claims without a `paper:` block: no claims table (a pre-registered study's verdicts.md holds its verdicts)
    paper = None if raw.get("paper") is None else PaperClaims.from_mapping(raw["paper"])
    summaries = raw.get("summaries") if summaries is None else str(summaries)
    preregistration = raw.get("preregistration")
    if preregistration is not None and not isinstance(preregistration, dict):
        raise ValueError(f"preregistration={preregistration!r} must be a mapping (the study's registered protocol)")
    if not isinstance(raw.get("pinned_revision", False), bool):
        raise ValueError(f"pinned_revision={raw['pinned_revision']!r} must be true or false")
    return Study(name=name, base=_base(_path(raw.get("base"), "base"), path), out_dir=Path(out_dir),
                 seeds=seeds, overrides=_overrides(raw.get("overrides"), "overrides"), evaluation=settings,
                 variants=variants, path=path, reference=references[0] if references else None,
                 references=tuple(references), claims=tuple(claims.items()), paper=paper,
                 summaries=None if summaries is None else _path(summaries, "summaries"),
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
              for name, value in sorted(m.router_options.changed().items())]
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


def shown_path(path: Path) -> str:
    """A path as the user would type it: relative to the current directory where it lies inside it (so a report
    rebuilt from the repository root reads the same in every checkout), else absolute."""
    path, here = Path(path).resolve(), Path.cwd().resolve()
    return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)
