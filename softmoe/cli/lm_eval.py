"""lm-evaluation-harness's own command line, with the "softmoe" model type registered first.

    softmoe lm-eval --model hf --model_args pretrained=HF_DIR,backend=causal --tasks arc_easy ...
    python -m softmoe.cli.lm_eval --model hf --model_args pretrained=HF_DIR,backend=causal --tasks arc_easy ...

Every argument goes to lm-eval unchanged (`softmoe lm-eval --help` prints lm-eval's help). The plain
`lm_eval` command cannot load an exported folder because it never imports softmoe, so transformers does not
know the "softmoe" model type unless told `trust_remote_code=True` (the folder's auto_map); this wrapper
registers it (softmoe.export.register) and then calls lm-eval's CLI entry point (lm_eval.__main__.cli_evaluate,
lm-eval 0.4.x).
"""

from __future__ import annotations

import sys
from pathlib import Path

from softmoe.cli.errors import fail


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI on `argv` (default: sys.argv[1:]); returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        return fail("lm-eval", f"lm-eval is not installed ({err}); pip install 'softmoe[lm-eval]'")
    missing = _missing_local_model(argv)
    if missing:
        return fail("lm-eval", missing)
    from softmoe.export.hf import register

    register()  # "softmoe" for AutoConfig / AutoModelForCausalLM, in this process

    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse errors and --help
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return 0


def _missing_local_model(argv: list[str]) -> str | None:
    """Why `--model_args pretrained=PATH` cannot load, where PATH is plainly a local path (absolute, ./ ../ ~, or
    more than one "/": not a hub id such as org/name) that does not exist; else None. lm-eval would otherwise try
    the hub with it and end in two tracebacks."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--model_args" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--model_args=") else None)
        if value is None:
            continue
        for item in value.split(","):
            key, _, path = item.partition("=")
            local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
            if key.strip() == "pretrained" and local and not Path(path).expanduser().exists():
                return f"--model_args pretrained={path}: no such folder (export one with softmoe export)"
    return None


if __name__ == "__main__":
    sys.exit(main())
