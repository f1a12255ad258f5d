"""Evaluation: perplexity and routing statistics over whole splits, zero-shot tasks, and the comparison report."""

from softmoe.common.lazy import lazy_exports

# Loaded on first use, so that `softmoe --help` (which imports this package's cli module) imports no torch.
_WHERE = {
    "TASKS": "softmoe.eval.downstream",
    "TaskResult": "softmoe.eval.downstream",
    "evaluate_tasks": "softmoe.eval.downstream",
    "LayerRouting": "softmoe.eval.perplexity",
    "SplitEval": "softmoe.eval.perplexity",
    "evaluate_split": "softmoe.eval.perplexity",
}

__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
