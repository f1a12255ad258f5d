"""The LM head and cross-entropy fused and chunked: the loss without (B, S, V) logits in memory.

Shape legend:
    R   rows (tokens) = B * S
    D   d_model
    V   vocab size
    C   rows of one chunk

`F.cross_entropy(F.linear(x, W).float(), targets)` holds the whole batch's logits several times over
(compute-dtype logits, their fp32 copy, log-softmax, its gradient): at the demo size (4096 rows x
8192 words) that is ~0.5 GB and a fifth of a training step spent in memory-bound passes over it.
`linear_cross_entropy` computes the same loss chunk by chunk: per chunk the logits (matmul in the
compute dtype, as autocast would run it), their fp32 log-sum-exp and the target logit. The loss is
the last node of the graph, so its gradient w.r.t. the logits, (softmax - onehot) / n, is known in
the forward pass: when a gradient is needed the forward also multiplies it into the head's two
gradients (dx = dlogits W, dW = dlogits^T x) chunk by chunk, and backward only scales them by the
incoming scalar. Per chunk the values are those of the unfused path (the same bf16 matmuls, the
same fp32 softmax), only dW is accumulated over chunks in fp32 instead of one bf16 matmul.
"""

from __future__ import annotations

import torch

from softmoe.common.checks import check_int
from softmoe.common.constants import IGNORE_INDEX
from softmoe.layers.experts import compute_dtype

__all__ = ["linear_cross_entropy", "IGNORE_INDEX", "CHUNK_ROWS"]

CHUNK_ROWS = 512  # rows per chunk: 512 x 8192 fp32 logits = 16 MB, fits in this machine's L3


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, weight_VD, targets_R, dtype, chunk_rows, need_grad):
        valid_R = targets_R != IGNORE_INDEX
        count = valid_R.sum()
        safe_R = torch.where(valid_R, targets_R, 0)
        w_VD = weight_VD.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=x_RD.device)
        grad_x = torch.empty_like(x_RD) if need_grad[0] else None
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=x_RD.device) if need_grad[1] else None
        inv_count = 1.0 / count.clamp(min=1).float()
        for start in range(0, x_RD.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            x_CD = x_RD[rows].to(dtype)
            logits_CV = (x_CD @ w_VD.t()).float()
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            target_logit_C = logits_CV.gather(1, safe_R[rows, None]).squeeze(1)
            valid_C = valid_R[rows]
            total = total + torch.where(valid_C, lse_C - target_logit_C, 0.0).sum()
            if grad_x is None and grad_w is None:
                continue
            # d(mean loss)/d logits = (softmax - onehot) / n on scored rows, 0 on ignored ones.
            grad_CV = logits_CV.sub_(lse_C[:, None]).exp_()
            grad_CV.scatter_add_(1, safe_R[rows, None], torch.full_like(lse_C[:, None], -1.0))
            grad_CV.mul_((valid_C.float() * inv_count)[:, None])
            grad_CV = grad_CV.to(dtype)
            if grad_x is not None:
                grad_x[rows] = (grad_CV @ w_VD).to(x_RD.dtype)
            if grad_w is not None:
                grad_w += grad_CV.t() @ x_CD
        ctx.save_for_backward(*(g for g in (grad_x, grad_w) if g is not None))
        ctx.has = (grad_x is not None, grad_w is not None)
        ctx.weight_dtype = weight_VD.dtype
        # NaN for no scored target, as F.cross_entropy's mean reduction gives.
        return total / count.float()

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grad_x = next(saved) * grad_loss if ctx.has[0] else None
        grad_w = (next(saved) * grad_loss).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy(x_RD: torch.Tensor, weight_VD: torch.Tensor, targets_R: torch.Tensor,
                         chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of the logits x_RD @ weight_VD^T against targets_R, chunk by chunk.

    Equals `F.cross_entropy(F.linear(x_RD, weight_VD).float(), targets_R, ignore_index=-100)` up to
    float rounding (the matmul runs in the autocast dtype when autocast is on, the softmax in fp32).

    Args:
        x_RD: (R, D) final hidden states.
        weight_VD: (V, D) the output head (here the tied embedding).
        targets_R: (R,) int64 next-token ids; -100 is not scored.
        chunk_rows: rows per chunk (>= 1).
    Returns:
        0-d float32 mean over scored rows (NaN when none is scored).
    """
    check_int("chunk_rows", chunk_rows, 1)
    if x_RD.dim() != 2 or weight_VD.dim() != 2 or x_RD.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"x_RD {tuple(x_RD.shape)} and weight_VD {tuple(weight_VD.shape)} must be (R, D) and (V, D)")
    if targets_R.shape != x_RD.shape[:1]:
        raise ValueError(f"targets_R has shape {tuple(targets_R.shape)}; it must be ({x_RD.shape[0]},)")
    grad_on = torch.is_grad_enabled()
    need_grad = (grad_on and x_RD.requires_grad, grad_on and weight_VD.requires_grad)
    return _LinearCrossEntropy.apply(x_RD, weight_VD, targets_R, compute_dtype(x_RD), chunk_rows, need_grad)
