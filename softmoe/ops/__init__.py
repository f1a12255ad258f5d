"""Pure tensor ops: LapSum soft top-k (forward and analytic backward)."""

from softmoe.ops.lapsum import log_soft_topk, soft_topk

__all__ = ["soft_topk", "log_soft_topk"]
