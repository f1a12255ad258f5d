"""The command line, above every library stage: `softmoe <command>` (app.py) and its commands, one module per
stage (data, train and generate, eval and compare, convert, demo, lm-eval), with one error wrapper (errors.py).

    python -m softmoe.cli --help        the same as `softmoe --help`
"""

from softmoe.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
