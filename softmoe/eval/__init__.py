"""Evaluation, measurement only: perplexity and routing statistics over whole splits, zero-shot tasks, FLOPs, the
budget dial, the gate-noise test and plot helpers (studies and their reports are in softmoe/studies/)."""

from softmoe.common.lazy import lazy_exports

# Loaded on first use, so that `softmoe --help` imports no torch.
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
