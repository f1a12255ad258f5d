"""The main job (README command 1): fetch the preset's corpus (prose for `demo`), train SoftMoE and its top-k baseline at the
same budget, evaluate both on the whole validation split, and write a report with plots.

    softmoe main [--preset demo] [--out runs/demo]

Every step is resumable: the corpus is cached, a finished training run is not repeated (its final
checkpoint is reused), and an interrupted one resumes from its last good checkpoint.
"""

from __future__ import annotations

import platform
import shlex
import time
from pathlib import Path

import torch

from softmoe.data import load_split, read_meta
from softmoe.data.io import unusable_dir
from softmoe.eval.perplexity import evaluate_split
from softmoe.studies.report import RunResult, compute_title, write_report
from softmoe.common.presets import presets_dir
from softmoe.routing import router_class
from softmoe.train.config import RunConfig, load_run_config
from softmoe.train.restore import load_model
from softmoe.train.runs import prepared_dataset_dir, train_or_reuse

__all__ = ["run_main_job", "check_preset_variants", "CONFIGS_DIR"]

CONFIGS_DIR = presets_dir()  # configs/ of a clone, or the presets packaged in the wheel
DEFAULT_VARIANTS = ("softmoe", "topk")
MAKE_RUN = "softmoe main --preset demo --out runs/demo"  # the Makefile's `make run`


def check_preset_variants(preset: str, variants: tuple[str, ...]) -> None:
    """ValueError naming --preset or --variants unless `preset` is a folder of CONFIGS_DIR holding every one of
    `variants` (distinct, non-empty names)."""
    presets = sorted(p.name for p in CONFIGS_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))
                     and p.name != "studies")
    if not preset or preset not in presets:
        raise ValueError(f"--preset {preset!r} is not a preset: choose one of {presets} (folders of {CONFIGS_DIR})")
    available = sorted(p.stem for p in (CONFIGS_DIR / preset).glob("*.yaml"))
    listed = ",".join(variants)
    if not variants or any(not v for v in variants):
        raise ValueError(f"--variants {listed!r} must be comma-separated variant names of preset {preset!r}: "
                         f"{available}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"--variants {listed!r} names a variant twice: each is trained once")
    missing = [v for v in variants if v not in available]
    if missing:
        raise ValueError(f"--variants {listed!r}: preset {preset!r} has no variant {missing[0]!r}; its variants are "
                         f"{available}")


def _variant_config(preset: str, variant: str, out_dir: Path, data_dir: Path | None,
                    overrides: tuple[str, ...]) -> RunConfig:
    path = CONFIGS_DIR / preset / f"{variant}.yaml"
    placed = [f"train.out_dir={out_dir}"] + ([f"data.data_dir={data_dir}"] if data_dir is not None else [])
    return load_run_config(path, [*placed, *overrides])


def _label(config: RunConfig) -> str:
    model = config.model
    if model.ffn == "dense":
        return "dense"
    return f"{router_class(model.router).label} ({model.describe_routing()})"


def _context(preset: str, variants: tuple[str, ...], dataset_dir: Path, configs: list[RunConfig],
             seconds: float, command: str) -> list[str]:
    meta = read_meta(dataset_dir)
    c = configs[0]
    tokens = c.train.steps * c.train.grad_accum * c.data.batch_size * c.data.seq_len
    files = ", ".join(f"`configs/{preset}/{variant}.yaml`" for variant in variants)
    return [
        f"Preset `{preset}`: {files}.",
        f"Data: corpus `{c.data.corpus}` ({dataset_dir}), BPE vocabulary {meta.get('vocab_size')}; "
        f"each run trains on {tokens:,} tokens ({c.train.steps} steps of {c.data.batch_size} x {c.data.seq_len}); "
        f"the final models are scored on the whole validation split.",
        f"Model: d_model {c.model.d_model}, {c.model.n_layers} layers, {_ffns(configs)}, precision "
        f"{c.train.precision}.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads in this process, "
        f"torch {torch.__version__}. Wall time of the whole job: {_duration(seconds)}.",
        f"Command: `{command}`" + (" (what `make run` does)." if command == MAKE_RUN else "."),
    ]


def _ffns(configs: list[RunConfig]) -> str:
    """The FFN of each variant, once per distinct one: '8 experts of width 32' / 'a dense FFN of width 128'."""
    described = [f"a dense FFN of width {c.model.d_ff}" if c.model.ffn == "dense"
                 else f"{c.model.num_experts} experts of width {c.model.d_expert}" for c in configs]
    return " / ".join(dict.fromkeys(described))


def _duration(seconds: float) -> str:
    """'42 s' under two minutes, else '3.4 min' (a tiny job's 0.3 min read as 0.0 before)."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main_command(preset: str, out_dir: Path, variants: tuple[str, ...], eval_max_batches: int | None,
                 overrides: tuple[str, ...]) -> str:
    """The `softmoe main` command line that reproduces a job (for the report)."""
    parts = ["softmoe main", f"--preset {preset}", f"--out {out_dir}"]
    if variants != DEFAULT_VARIANTS:
        parts.append(f"--variants {','.join(variants)}")
    if eval_max_batches is not None:
        parts.append(f"--max-batches {eval_max_batches}")
    return " ".join(parts + [shlex.quote(item) for item in overrides])


def run_main_job(preset: str = "demo", out_dir: Path = Path("runs/demo"), data_dir: Path | None = None,
                 variants: tuple[str, ...] = DEFAULT_VARIANTS, eval_max_batches: int | None = None,
                 overrides: tuple[str, ...] = (), progress: bool = False) -> Path:
    """Fetch, train every variant, evaluate, report. Returns the report's path.

    Args:
        preset: folder under configs/ holding one YAML per variant.
        out_dir: parent of the run directories and of report.md.
        data_dir: data directory (None: $SOFTMOE_DATA_DIR or <repo>/data).
        variants: preset variants to train, e.g. ("softmoe", "topk").
        eval_max_batches: cap on validation batches of the final evaluation (None: whole split).
        overrides: `section.key=value` settings applied to every variant.
        progress: bars for data preparation and evaluation on a terminal (training's is `train.progress`).
    """
    start = time.time()
    out_dir = Path(out_dir)
    check_preset_variants(preset, variants)
    configs = [_variant_config(preset, variant, out_dir, data_dir, overrides) for variant in variants]
    why = unusable_dir(out_dir)
    if why:
        raise ValueError(f"--out {str(out_dir)!r} {why}")
    print(f"== data: {configs[0].data.corpus} ==", flush=True)
    dataset_dir = prepared_dataset_dir(configs[0].data, progress)
    results = []
    for i, config in enumerate(configs, 1):
        print(f"== [{i}/{len(configs)}] training {config.train.name} ==", flush=True)
        run_dir = train_or_reuse(config)
        model, _, _ = load_model(run_dir, report=lambda message: print(message, flush=True),
                                 device=config.train.device)
        what = "the whole validation split" if eval_max_batches is None else \
            f"the first {eval_max_batches} validation batches"
        print(f"== [{i}/{len(configs)}] evaluating {config.train.name} on {what} ==", flush=True)
        final = evaluate_split(model, load_split(dataset_dir, "val"), config.data.seq_len,
                               config.data.batch_size, config.train.precision, eval_max_batches,
                               progress=progress, desc=f"scoring {config.train.name}")
        results.append(RunResult(_label(config), run_dir, final))
    spent = compute_title(results)
    title = f"{' vs '.join(r.label for r in results)}, preset `{preset}`" + (f": {spent}" if spent else "")
    command = main_command(preset, out_dir, variants, eval_max_batches, overrides)
    context = _context(preset, variants, dataset_dir, configs, time.time() - start, command)
    return write_report(results, out_dir, title, context)
