"""Evaluation: perplexity and routing statistics over whole splits, zero-shot tasks, and the comparison report."""

from softmoe.eval.downstream import TASKS, TaskResult, evaluate_tasks
from softmoe.eval.perplexity import LayerRouting, SplitEval, evaluate_split

__all__ = ["LayerRouting", "SplitEval", "TASKS", "TaskResult", "evaluate_split", "evaluate_tasks"]
