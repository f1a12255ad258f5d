"""Progress bars for long work (scoring, the budget dial, studies, the main job's phases).

A bar is drawn on stderr only when it is a terminal and the command was not given `--quiet`: logs and
pipes get the plain one-line messages only.
"""

from __future__ import annotations

__all__ = ["progress_bar", "transformers_bars_follow_the_terminal"]


def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "it"):
    """A tqdm bar (a no-op object when disabled or stderr is not a terminal); use `.update(n)`, `.close()`."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False,
                dynamic_ncols=True)


def transformers_bars_follow_the_terminal() -> None:
    """Turn transformers' own bars (loading and writing shards) off unless stderr is a terminal, as ours are.
    transformers keeps this setting per process: the CLI verbs that load or save transformers models call it."""
    import sys

    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
