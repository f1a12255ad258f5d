"""The `softmoe` command line: one subcommand per stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softmoe.cli.convert import add_convert_parser
from softmoe.cli.data import add_data_parser
from softmoe.cli.errors import UserError, check_out_dir, fail, run_command, user_errors
from softmoe.cli.eval import add_compare_parser, add_eval_parser
from softmoe.cli.train import add_generate_parser, add_train_parser


def _cmd_demo(args: argparse.Namespace) -> int:
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed={args.seed} must be in [0, 2**63)")
    from softmoe.cli.demo import run_demo

    run_demo(seed=args.seed)
    return 0


def _cmd_main(args: argparse.Namespace) -> int:
    check_out_dir("--out", args.out)  # created once the preset and overrides are known to be good
    from softmoe.data.fetch import FetchError
    from softmoe.studies.main_job import run_main_job
    from softmoe.train.checkpoint import CheckpointError
    from softmoe.train.loop import TrainingAborted

    overrides = (*args.overrides, "train.progress=false") if args.quiet else tuple(args.overrides)
    # bad preset/override, run dir, data, a diverged run
    with user_errors(ValueError, TypeError, FetchError, CheckpointError, TrainingAborted):
        report = run_main_job(args.preset, args.out, args.data_dir, tuple(args.variants.split(",")),
                              args.eval_max_batches, overrides, progress=not args.quiet)
    print(f"report written: {report}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from softmoe.common.extras import require

    require("transformers", "hf", "softmoe export")
    from softmoe.common.progress import transformers_bars_follow_the_terminal
    from softmoe.export.checkpoint import export_checkpoint  # imports transformers: only when exporting
    from softmoe.train.checkpoint import CheckpointError

    transformers_bars_follow_the_terminal()
    with user_errors(CheckpointError, ValueError, OSError):  # --out a file or a folder in use, ...
        export_checkpoint(args.checkpoint, Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from softmoe import __version__

    parser = argparse.ArgumentParser(prog="softmoe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"softmoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="print soft top-k weights next to hard top-k on a few score rows")
    demo.add_argument("--seed", type=int, default=0, help="seed for the random score rows")
    demo.set_defaults(func=_cmd_demo)

    main = sub.add_parser("main", help="the main job: fetch prose, train SoftMoE and top-k, evaluate, write a report")
    main.add_argument("--preset", default="demo", help="folder under configs/ (default: demo)")
    main.add_argument("--out", type=Path, default=Path("runs/demo"), help="where runs and report.md go")
    main.add_argument("--data-dir", type=Path, default=None,
                      help="data directory (default: $SOFTMOE_DATA_DIR, else data/ of the source checkout or ./data)")
    main.add_argument("--variants", default="softmoe,topk", help="comma-separated preset variants to train")
    main.add_argument("--max-batches", "--eval-max-batches", dest="eval_max_batches", type=int, default=None,
                      help="cap validation batches of the final evaluation (default: whole split)")
    main.add_argument("--quiet", action="store_true", help="no progress bars (also off when not a terminal)")
    main.add_argument("overrides", nargs="*", help="section.key=value settings for every variant (e.g. train.steps=50)")
    main.set_defaults(func=_cmd_main, resumable=True)

    export = sub.add_parser("export", help="convert a training checkpoint to a transformers folder")
    export.add_argument("--checkpoint", required=True, help="a checkpoint or run directory (newest good)")
    export.add_argument("--out", required=True, type=Path, help="output transformers folder")
    export.set_defaults(func=_cmd_export)

    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness's CLI with the softmoe model type registered (all arguments go to lm-eval)")

    add_convert_parser(sub)
    add_data_parser(sub)
    add_train_parser(sub)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_compare_parser(sub)
    for command in sub.choices.values():  # every verb's help shows its defaults
        _show_defaults(command)
    return parser


class _DefaultsHelp(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is False or default == argparse.SUPPRESS or not action.option_strings
                or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _DefaultsHelp
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def _given_twice(overrides: list[str]) -> str | None:
    """Why `overrides` set one key twice (the last would win silently), or None."""
    seen: dict[str, str] = {}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in seen:
            return f"override {key} given twice ({seen[key]!r} and {item!r}): give it once"
        seen[key] = item
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # a passthrough: lm-eval's own options must not meet our parser
        from softmoe.cli.lm_eval import main as lm_eval_main

        return lm_eval_main(argv[1:])
    parser = build_parser()
    # `train --config X --resume a.b=1`: argparse stops the positional overrides at the first flag; the
    # key=value items after it come back unrecognised and are overrides too.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    twice = _given_twice(getattr(args, "overrides", None) or [])
    if twice:
        return fail(args.command, twice)
    return run_command(args)
