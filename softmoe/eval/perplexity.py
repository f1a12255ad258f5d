"""Loss, perplexity and routing statistics of a model over a whole split.

Shape legend:
    B   windows per batch
    T   tokens per window
    E   experts

Every target of the split is scored exactly once (`softmoe.data.eval_batches`), the loss is the
token-weighted mean, and routing statistics are accumulated over all real tokens, not read off
the last batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from softmoe.common.checks import check_float, check_int
from softmoe.common.precision import autocast_context, module_device
from softmoe.data import IGNORE_INDEX, eval_batches
from softmoe.data.loader import num_eval_batches
from softmoe.model import GPT
from softmoe.common.progress import progress_bar
from softmoe.routing.diagnostics import load_diagnostics

__all__ = ["LayerRouting", "SplitEval", "accumulate_routing", "bits_per_byte", "evaluate_split"]


def bits_per_byte(loss: float, tokens: int, num_bytes: int) -> float:
    """Bits per UTF-8 byte of text: loss (nats/token) * tokens / (bytes * ln 2).

    Unlike per-token perplexity it does not depend on the tokenizer, so BPE and word-level models
    (or two BPE vocabularies) compare on the same text.
    """
    check_int("num_bytes", num_bytes, 1)
    check_int("tokens", tokens, 0)
    check_float("loss", loss, 0)
    return loss * tokens / (num_bytes * math.log(2))


@dataclass
class LayerRouting:
    """Routing of one MoE layer accumulated over an evaluation.

    Attributes:
        block: the block index of the layer.
        k: the layer's k (budget k_l for SoftMoE, fixed k for top-k), at evaluation time.
        active_hist: (E + 1,) number of tokens that used 0..E experts.
        expert_tokens: (E,) number of (token, expert) pairs routed to each expert.
    """

    block: int
    k: float
    active_hist: np.ndarray
    expert_tokens: np.ndarray
    spread_sum: float = 0.0  # sum over batches of (logit spread x real tokens)

    @property
    def tokens(self) -> float:
        """Real tokens routed (the histogram's total)."""
        return float(self.active_hist.sum())

    @property
    def logit_spread(self) -> float:
        """Token-weighted mean of the router logit spread (routing/diagnostics.py)."""
        return self.spread_sum / max(self.tokens, 1.0)

    @property
    def load_diagnostics(self) -> dict[str, float]:
        """load_max_over_mean, load_cv, dead_fraction of the accumulated expert load."""
        counts = torch.as_tensor(self.expert_tokens, dtype=torch.float64)
        return {key: float(value) for key, value in load_diagnostics(counts).items()}

    @property
    def active_mean(self) -> float:
        counts = np.arange(self.active_hist.shape[0])
        return float((counts * self.active_hist).sum() / max(self.active_hist.sum(), 1))

    @property
    def expert_load(self) -> np.ndarray:
        """(E,) fraction of routed pairs per expert."""
        return self.expert_tokens / max(self.expert_tokens.sum(), 1)


@dataclass
class SplitEval:
    """Evaluation of one split."""

    loss: float  # mean cross-entropy per token (nats)
    tokens: int  # scored targets
    layers: list[LayerRouting] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def active_experts_mean(self) -> float | None:
        """Mean over MoE layers of the realized active experts per token (None for a dense model)."""
        if not self.layers:
            return None
        return sum(layer.active_mean for layer in self.layers) / len(self.layers)


def accumulate_routing(layers: dict[int, LayerRouting], out_routing) -> None:
    """Add one batch's per-layer histograms and loads (`DecoderOutput.routing`) into `layers` (keyed by block)."""
    for block, stats in out_routing.items():
        hist = stats["active_experts_hist"].double().cpu().numpy()
        # expert_load is a fraction of this batch's pairs; pairs = sum over tokens of active experts.
        pairs = float((np.arange(hist.shape[0]) * hist).sum())
        load = stats["expert_load"].double().cpu().numpy() * pairs
        k = float(stats["k"])
        if block not in layers:
            layers[block] = LayerRouting(block, k, np.zeros_like(hist), np.zeros_like(load))
        layers[block].active_hist += hist
        layers[block].expert_tokens += load
        if "logit_spread" in stats:
            layers[block].spread_sum += float(stats["logit_spread"]) * float(hist.sum())


@torch.no_grad()
def evaluate_split(
    model: GPT, tokens: np.ndarray, seq_len: int, batch_size: int = 16, precision: str = "fp32",
    max_batches: int | None = None, progress: bool = False, desc: str = "scoring",
) -> SplitEval:
    """Score a split with non-overlapping windows.

    Args:
        model: the decoder (put in eval mode; its mode is restored).
        tokens: (N,) token ids of the split.
        seq_len: T, window length (at most the model's max_seq_len).
        batch_size: B.
        precision: "fp32" or "bf16" (autocast on the model's device; routing stays fp32).
        max_batches: optional cap, for quick looks; None scores the whole split.
        progress: show a progress bar (on a terminal), labelled `desc`.
    """
    check_int("max_batches", max_batches, 1, allow_none=True)
    was_training = model.training
    model.eval()
    device = module_device(model)
    total_nats, total_tokens = 0.0, 0
    layers: dict[int, LayerRouting] = {}
    total = num_eval_batches(int(tokens.shape[0]), seq_len, batch_size)
    bar = progress_bar(total if max_batches is None else min(total, max_batches), desc, progress, unit="batch")
    for i, (idx_BT, targets_BT) in enumerate(eval_batches(tokens, seq_len, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        bar.update(1)
        idx_BT, targets_BT = idx_BT.to(device, non_blocking=True), targets_BT.to(device, non_blocking=True)
        with autocast_context(precision, device):
            out = model(idx_BT, targets_BT, return_logits=False)
        scored = int((targets_BT != IGNORE_INDEX).sum())
        total_nats += float(out.loss) * scored
        total_tokens += scored
        accumulate_routing(layers, out.routing)
    bar.close()
    model.train(was_training)
    return SplitEval(loss=total_nats / max(total_tokens, 1), tokens=total_tokens, layers=list(layers.values()))
