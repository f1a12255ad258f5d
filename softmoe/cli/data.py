"""`softmoe data ...` subcommands: argument wiring only; the work is in `prepare`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from softmoe.cli.errors import as_typed, fail

__all__ = ["add_data_parser", "format_summary"]


def format_summary(meta: dict, dataset_dir: Path, seconds: float) -> str:
    """A plain-text table of one prepared dataset: sources, then documents/chars/tokens per split."""
    lines = [f"dataset {meta['name']} at {dataset_dir}  ({seconds:.1f} s)",
             f"tokenizer {meta['tokenizer']['kind']}, vocab {meta['vocab_size']}, "
             f"separator {meta['sep_token']!r}"]
    for src in meta["sources"]:
        size = f"{src['size'] / 1e6:.2f} MB" if "size" in src else ""
        lines.append(f"  source {src['name']:<12} {src.get('package', '')}=={src['version']}  {size}")
    lines.append(f"  {'split':<6} {'documents':>10} {'chars':>12} {'tokens':>11} {'chars/token':>12}")
    for split in ("train", "val", "test"):
        s = meta["splits"][split]
        ratio = s["chars"] / max(s["tokens"], 1)
        counts = f"{s['documents']:>10,} {s['chars']:>12,} {s['tokens']:>11,}"
        lines.append(f"  {split:<6} {counts} {ratio:>12.2f}")
    return "\n".join(lines)


def _cmd_fetch(args: argparse.Namespace) -> int:
    from softmoe.data.fetch import FetchError
    from softmoe.data.prepare import prepare, read_meta, resolve_tokenizer

    corpora = ["prose", "ptb"] if args.corpus == "all" else [args.corpus]
    for corpus in corpora:  # every corpus's request, before anything is fetched or built
        try:
            resolve_tokenizer(corpus, None, args.vocab_size)
        except ValueError as err:
            return fail("data fetch", f"--corpus {args.corpus}: {as_typed(str(err), {'vocab_size': '--vocab-size'})}")
    for corpus in corpora:
        start = time.perf_counter()
        try:
            dataset_dir = prepare(corpus, args.data_dir, offline=args.offline, vocab_size=args.vocab_size,
                                  progress=not args.quiet)
        except (FetchError, ValueError, OSError) as err:  # --offline with nothing cached, bad --data-dir, ...
            return fail("data fetch", str(err))
        print(format_summary(read_meta(dataset_dir), dataset_dir, time.perf_counter() - start))
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data fetch` on the top-level subparsers of the softmoe CLI."""
    data = subparsers.add_parser("data", help="fetch, verify and tokenize the training corpora")
    sub = data.add_subparsers(dest="data_command", required=True)
    fetch = sub.add_parser(
        "fetch", help="download the pinned sources (sha256-verified), split, tokenize, summarize"
    )
    fetch.add_argument("--corpus", choices=["prose", "ptb", "all"], default="prose",
                       help="which corpus (default prose)")
    fetch.add_argument("--data-dir", type=Path, default=None,
                       help="data directory (default: $SOFTMOE_DATA_DIR, else data/ of the source checkout or ./data)")
    fetch.add_argument("--vocab-size", type=int, default=None,
                       help="BPE vocabulary (default 8192; ptb uses its word vocabulary)")
    fetch.add_argument("--offline", action="store_true",
                       help="use cached downloads only; never touch the network")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar (also off when not a terminal)")
    fetch.set_defaults(func=_cmd_fetch)
    return data
