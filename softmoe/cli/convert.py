"""`softmoe convert --checkpoint HF_DIR --out OUT_DIR`: retrofit a saved transformers MoE model with SoftMoE routing."""

from __future__ import annotations

import argparse
from pathlib import Path

from softmoe.cli.errors import user_errors

# RetrofitConfig's defaults, written out so that building the parser (`softmoe --help`) imports no torch;
# tests/unit/convert/test_from_hf.py checks they equal the dataclass's.
DEFAULTS = {"alpha": 1e-3, "truncation": "relative", "threshold": 1.8, "min_weight": 0.05}


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="retrofit a transformers Mixtral / Qwen2-MoE / OLMoE folder with SoftMoE routing")
    p.add_argument("--checkpoint", "--model", dest="model", required=True, type=Path, metavar="HF_DIR",
                   help="a local transformers folder (config.json + weights); --model is the old name")
    p.add_argument("--out", required=True, type=Path, help="output folder (load it with softmoe.convert.from_pretrained)")
    p.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="initial soft top-k scale, logit units")
    p.add_argument("--budget", type=float, default=None, help="global mean active experts K (default: the model's top-k)")
    p.add_argument("--truncation", choices=("relative", "min_weight"), default=DEFAULTS["truncation"],
                   help="relative: the paper's clamped threshold (--threshold x k/E); min_weight: p >= --min-weight")
    p.add_argument("--threshold", type=float, default=DEFAULTS["threshold"], help="relative truncation threshold")
    p.add_argument("--min-weight", type=float, default=DEFAULTS["min_weight"], help="min_weight truncation: p cut")
    p.add_argument("--max-active", type=int, default=None, help="optional cap on experts per token")
    p.add_argument("--learn-alpha", action="store_true", help="make log alpha per layer trainable")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from softmoe.common.extras import require

    require("transformers", "hf", "softmoe convert")
    options = {"alpha": args.alpha, "truncation": args.truncation, "threshold": args.threshold,
               "min_weight": args.min_weight, "max_active": args.max_active,
               "learn_alpha": args.learn_alpha}
    if args.budget is not None:
        options["budget"] = args.budget
    from softmoe.common.progress import transformers_bars_follow_the_terminal
    from softmoe.convert.folder import convert_folder

    transformers_bars_follow_the_terminal()

    flags = {"alpha": "--alpha", "budget": "--budget", "truncation": "--truncation", "threshold": "--threshold",
             "min_weight": "--min-weight", "max_active": "--max-active"}
    with user_errors(ValueError, TypeError, OSError, flags=flags):
        convert_folder(args.model, args.out, **options)
    return 0
