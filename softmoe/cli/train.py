"""The `softmoe train` and `softmoe generate` subcommands (registered by softmoe/cli/app.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softmoe.cli.errors import UserError, user_errors

__all__ = ["add_train_parser", "add_generate_parser"]


def _cmd_train(args: argparse.Namespace) -> int:
    from softmoe.data.fetch import FetchError
    from softmoe.parallel.launch import build_trainer, finish
    from softmoe.train.checkpoint import CheckpointError
    from softmoe.train.config import load_run_config
    from softmoe.routing.record import DispatchOverflow
    from softmoe.train.loop import TrainingAborted
    from softmoe.train.rundir import RunDirError, resume_config

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after={args.stop_after} must be >= 1")
    flags = ([f"train.out_dir={args.out}"] if args.out is not None else []) + \
        ([f"data.data_dir={args.data_dir}"] if args.data_dir is not None else [])
    args.overrides = [*args.overrides, *flags, *(["train.progress=false"] if args.quiet else [])]
    try:
        config = load_run_config(args.config, args.overrides)
        if args.resume:  # the run's own config.yaml; the preset only locates the run directory
            config = resume_config(config, args.overrides)
    except (ValueError, TypeError) as err:
        raise UserError(f"{'' if isinstance(err, RunDirError) else 'invalid config: '}{err}") from err
    if args.stop_after is not None and args.stop_after > config.train.steps:
        raise UserError(f"--stop-after={args.stop_after} is beyond train.steps={config.train.steps}, where the run "
                        f"ends anyway")
    bad_path = _unusable_paths(config)
    if bad_path:
        raise UserError(bad_path)
    with user_errors(FetchError, OSError, ValueError):  # data not prepared or damaged, vocab mismatch, ...
        trainer = build_trainer(config)  # one process, or one rank of a torchrun launch (parallel.data)
    variant = f"{config.model.router} ({config.model.describe_routing()})" if config.model.ffn == "moe" else "dense"
    if trainer.writes_run_files:
        print(f"run {config.train.run_dir}: {variant}, {trainer.num_params():,} parameters, "
              f"{config.train.steps} steps, precision {config.train.precision}")
    try:
        result = trainer.fit(resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    except (RunDirError, CheckpointError, TrainingAborted, DispatchOverflow, OSError) as err:
        # a rank's own error; one every rank of a distributed run raised from rank 0 is reported by rank 0 alone
        raise UserError(str(err), every_rank=getattr(err, "every_rank", False)) from err
    finally:
        finish(trainer)  # a distributed run leaves its process group
    if not trainer.writes_run_files:  # the non-zero ranks of a distributed run: rank 0 reports
        return 0
    if result.interrupted:
        print(f"interrupted at step {result.step}: checkpoint {result.checkpoint}; continue with --resume")
        return 130
    train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    val_loss = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    tok = f"{result.tokens_per_sec:.0f}" if result.tokens_per_sec else "n/a"
    active = ""
    if result.mean_active_experts:
        train = f"{result.train_ae:.2f}" if result.train_ae is not None else "n/a"
        active = f", AE (realized experts per token) train {train} / infer {result.mean_active_experts:.2f}"
        if config.model.uses_budget:  # what K holds: the paper's rule makes it a soft mass, not a count
            held = "realized count" if config.model.budget_options.realized else "soft mass"
            active += f" at K={config.model.k:g} ({held})"
    skipped = ""
    if result.skipped_steps:  # tolerated (train.max_bad_steps in a row), never silent
        skipped = (f"; {result.skipped_steps} of {result.step} steps skipped as non-finite (weights unchanged on "
                   f"them; see metrics.jsonl)")
    print(f"done at step {result.step}: train loss {train_loss}, val loss {val_loss}, "
          f"{tok} tok/s{active}{skipped}; checkpoint {result.checkpoint}; metrics {result.run_dir}/metrics.jsonl")
    return 0


def _unusable_paths(config) -> str | None:
    """Why data.data_dir / train.out_dir cannot be used (a file, not creatable), or None."""
    from softmoe.data.io import unusable_dir

    for key, path, create in (("data.data_dir", config.data.resolved_data_dir, False),
                              ("train.out_dir", Path(config.train.out_dir), True)):
        why = unusable_dir(path, create)
        if why:
            return f"{key}={str(path)!r} {why}"
    return None


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from softmoe.common.checks import check_float
    from softmoe.model import generate
    from softmoe.train.checkpoint import CheckpointError
    from softmoe.train.restore import load_for_inference

    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed={args.seed} must be in [0, 2**63), as train.seed and demo --seed")
    if args.threads < 1:
        raise UserError(f"--threads={args.threads} must be >= 1")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    with user_errors(ValueError):  # before loading anything (and before the note on --max-new-tokens below)
        check_float("--temperature", args.temperature, 0)
        check_float("--top-p", args.top_p, 0, 1, open_low=True)
    # Decoding runs one token per forward: tiny ops, where a second intra-op thread only adds sync cost.
    torch.set_num_threads(args.threads)
    with user_errors(CheckpointError, ValueError):
        model, tokenizer, path = load_for_inference(args.checkpoint, device=args.device)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
        raise UserError("--prompt is not valid UTF-8 text") from None
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise UserError("the prompt encodes to zero tokens")
    context = model.config.max_seq_len
    room = context - len(ids)
    if room < 1:
        raise UserError(f"the prompt is {len(ids)} tokens, which fills the model's context of {context} tokens "
                        f"(model.max_seq_len): shorten --prompt")
    max_new_tokens = min(args.max_new_tokens, room)
    if max_new_tokens < args.max_new_tokens:  # a note, not an error: generate what fits
        print(f"softmoe generate: --max-new-tokens {args.max_new_tokens} cut to {room}: the prompt's {len(ids)} "
              f"tokens and {room} new ones fill the model's context of {context} tokens", file=sys.stderr)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with user_errors(ValueError, TypeError):
        out = generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, generator=generator)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML preset (configs/<preset>/<variant>.yaml)")
    p.add_argument("--config", required=True,
                   help="YAML file with model / data / train sections, or a packaged preset name (tiny/softmoe)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=3e-4 model.n_layers=2")
    p.add_argument("--resume", action="store_true",
                   help="continue the run (train.out_dir/train.name) from its newest good checkpoint, with the "
                        "run's own config.yaml; overrides may change what leaves the trajectory alone (logging, "
                        "evaluation and checkpoint cadence, threads, paths) and may raise train.steps to extend it")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="parent of the run directory (the same as train.out_dir=DIR; default: the preset's)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data directory (the same as data.data_dir=DIR; default: the preset's, $SOFTMOE_DATA_DIR, "
                        "else data/ of the source checkout or ./data)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (the same as train.progress=false; also off when not a terminal)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what the run directory holds and start again (default: refuse an existing run)")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="checkpoint and stop once STEP steps are done (resume later with --resume)")
    p.set_defaults(func=_cmd_train)


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample a continuation of a prompt from a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory (newest good)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="tokens to generate; cut (with a note) to what fits in the model's context after the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for decoding)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:<index>")
    p.set_defaults(func=_cmd_generate)
