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

from softmoe.cli.errors import fail


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI on `argv` (default: sys.argv[1:]); returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        return fail("lm-eval", f"lm-eval is not installed ({err}); pip install 'softmoe[lm-eval]'")
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


if __name__ == "__main__":
    sys.exit(main())
