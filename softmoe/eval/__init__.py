"""Evaluation: perplexity and routing statistics over whole splits, and the comparison report."""

from softmoe.eval.perplexity import LayerRouting, SplitEval, evaluate_split

__all__ = ["LayerRouting", "SplitEval", "evaluate_split"]
