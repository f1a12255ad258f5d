"""Evaluation: perplexity and routing statistics over whole splits, zero-shot tasks, and the comparison report."""

import importlib

_WHERE = {
    "TASKS": "softmoe.eval.downstream",
    "TaskResult": "softmoe.eval.downstream",
    "evaluate_tasks": "softmoe.eval.downstream",
    "LayerRouting": "softmoe.eval.perplexity",
    "SplitEval": "softmoe.eval.perplexity",
    "evaluate_split": "softmoe.eval.perplexity",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    # Loaded on first use, so that `softmoe --help` (which imports this package's cli module) imports no torch.
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
