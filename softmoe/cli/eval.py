"""The `softmoe eval` and `softmoe compare` subcommands (registered by softmoe/cli/app.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from softmoe.cli.errors import UserError, check_out_dir, user_errors

__all__ = ["add_compare_parser", "add_eval_parser", "parse_budgets", "parse_list", "parse_tasks"]


def parse_list(text: str | None, name: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'); None -> (). Empty items are an error naming the option."""
    if text is None:
        return ()
    items = tuple(item.strip() for item in text.split(","))
    if not all(items):
        raise ValueError(f"{name}={text!r} must be a comma-separated list without empty items")
    return items


def parse_tasks(text: str) -> tuple[str, ...]:
    """--tasks: 'none' -> (), 'all' -> ('all',), else the names."""
    if text.strip() == "none":
        return ()
    tasks = parse_list(text, "--tasks")
    if "all" in tasks and len(tasks) > 1:
        raise ValueError(f"--tasks={text!r}: 'all' cannot be combined with task names")
    return tasks


def parse_budgets(text: str | None) -> tuple[float, ...]:
    """--budget '1.0,1.5' -> (1.0, 1.5)."""
    values = []
    for item in parse_list(text, "--budget"):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"--budget={text!r}: {item!r} is not a number") from None
    if len(set(values)) != len(values):
        raise ValueError(f"--budget={text!r} lists a budget twice")
    return tuple(values)


def _fmt3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out_dir("--out", args.out)
    from softmoe.data.fetch import FetchError
    from softmoe.eval.evaluate import EvalSettings, evaluate_checkpoint, run_dir_of, write_eval
    from softmoe.train.checkpoint import CheckpointError

    flags = {name: "--" + name.replace("_", "-") for name in ("limit", "precision", "batch_size", "max_batches",
                                                                "data_dir", "seed", "device")}
    with user_errors(CheckpointError, FetchError, FileNotFoundError, ValueError, flags=flags):
        settings = EvalSettings(
            splits=parse_list(args.splits, "--splits"), corpora=parse_list(args.corpora, "--corpora"),
            tasks=parse_tasks(args.tasks), limit=args.limit, budgets=parse_budgets(args.budget),
            precision=args.precision, batch_size=args.batch_size, max_batches=args.max_batches,
            data_dir=args.data_dir, seed=args.seed, device=args.device)
        payload, points = evaluate_checkpoint(args.checkpoint, settings, progress=not args.quiet)
    out = args.out if args.out is not None else run_dir_of(Path(payload["model"]["checkpoint"])) / "eval"
    try:
        json_path, md_path = write_eval(payload, points, out)
    except OSError as err:
        raise UserError(f"--out {str(out)!r}: cannot write ({err.strerror or err})") from err
    for e in payload["language_modelling"]:
        bpb = "-" if e["bits_per_byte"] is None else f"{e['bits_per_byte']:.4f}"
        print(f"{e['corpus']}/{e['split']}: loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f}, "
              f"bits per byte {bpb}, Infer AE (active experts per token) {_fmt3(e['routing']['active_experts_mean'])}")
    for name, task in payload["tasks"].items():
        scores = [f"acc {task['acc']:.3f}"]
        if task.get("acc_norm") is not None:
            scores.append(f"acc_norm {task['acc_norm']:.3f}")
        if task.get("perplexity") is not None:
            scores.append(f"perplexity {task['perplexity']:.1f}")
        print(f"{name} (zero-shot, {task['n']} items): {', '.join(scores)}, "
              f"Infer AE {_fmt3(task.get('active_experts_mean'))}")
    for p in points:
        print(f"budget K'={p.budget:g}: loss {p.loss:.4f}, "
              f"realized mean active experts {p.active_experts_mean:.3f}")
    print(f"wrote {json_path} and {md_path}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from softmoe.studies.plan import describe_plan, load_study, plan_runs
    from softmoe.studies.run import run_study

    for flag, value, low in (("--jobs", args.jobs, 1), ("--next", args.next, 0)):
        if value is not None and value < low:  # checked before --dry-run too, which would ignore them
            raise UserError(f"{flag}={value} must be >= {low}")
    with user_errors(ValueError, TypeError):
        no_summaries = args.summaries is not None and args.summaries.strip() == "none"
        study = load_study(args.study, args.out, summaries=None if no_summaries else args.summaries)
        if no_summaries:  # `--summaries none`: this sitting reads and writes no summaries (was a folder "none")
            study = dataclasses.replace(study, summaries=None)
        if args.quiet:
            args.overrides = [*args.overrides, "train.progress=false"]
        runs = plan_runs(study, tuple(args.overrides))
    print(describe_plan(study, runs), flush=True)
    if args.dry_run:
        return 0
    if study.summaries is not None:  # before any training: a run's summary is written when it finishes
        check_out_dir("--summaries", study.summaries, create=True)
    check_out_dir("output directory", study.out_dir, create=True)
    from softmoe.data.fetch import FetchError
    from softmoe.train.checkpoint import CheckpointError
    from softmoe.train.loop import TrainingAborted

    # a run dir of another config, data, a diverged run, ...
    with user_errors(ValueError, TypeError, FetchError, CheckpointError, TrainingAborted):
        report = run_study(study, tuple(args.overrides), progress=not args.quiet, next_runs=args.next,
                           force=args.force, jobs=args.jobs, mixed_revisions=args.mixed_revisions)
    print(f"results written: {report} (and results.json, plots) ")
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss / perplexity / bits per byte, routing, FLOPs, zero-shot tasks and the "
                                    "budget dial of one checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory (newest good)")
    p.add_argument("--splits", default="val,test", help="comma-separated splits (default: val,test)")
    p.add_argument("--corpora", default=None,
                   help="comma-separated corpora: tiny, prose, ptb (default: the model's own; ptb for a BPE model "
                        "re-encodes PTB's text with the model's tokenizer)")
    p.add_argument("--tasks", default="none", help="zero-shot tasks: names, 'all' or 'none' (default: none)")
    p.add_argument("--limit", type=int, default=None, help="items per zero-shot task (default: all)")
    p.add_argument("--budget", default=None,
                   help="budget dial: comma-separated global budgets K' (SoftMoE only), e.g. 1.0,1.5,2.0")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <run dir>/eval)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: the training precision")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: the run's)")
    p.add_argument("--max-batches", type=int, default=None, help="cap batches per split (quick looks; no bpb)")
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's, $SOFTMOE_DATA_DIR, else "
                                                    "data/ of the source checkout or ./data)")
    p.add_argument("--seed", type=int, default=0, help="zero-shot scorer seed (bootstrap intervals)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:<index>")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also off when not a terminal)")
    p.set_defaults(func=_cmd_eval)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train and evaluate a study's variants over seeds; results.md with plots")
    p.add_argument("--config", "--study", dest="study", required=True,
                   help="study YAML, e.g. configs/studies/small.yaml (--study is the old name)")
    p.add_argument("--out", default=None, help="output directory (default: the study's out_dir)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and token counts, train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also off when not a terminal)")
    p.add_argument("--next", type=int, default=None, metavar="N",
                   help="train only the next N runs without a summary (plan order), then report everything "
                        "summarised; 0 reports without training")
    p.add_argument("--force", action="store_true",
                   help="ignore existing run summaries: evaluate and summarise those runs again")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with train.threads=1 (default 1)")
    p.add_argument("--summaries", default=None,
                   help="directory of the committed run summaries and the study report (default: the study's "
                        "`summaries`; none: no summaries)")
    p.add_argument("--mixed-revisions", action="store_true",
                   help="write the results even when the runs were trained by different code revisions")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides applied to every run after the study's (e.g. train.steps=50)")
    p.set_defaults(func=_cmd_compare, resumable=True)
