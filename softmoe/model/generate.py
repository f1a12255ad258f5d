"""Autoregressive sampling with the KV cache: temperature, top-p (nucleus), greedy at temperature 0."""

from __future__ import annotations

import torch

from softmoe.common.checks import check_float, check_int
from softmoe.model.decoder import GPT

__all__ = ["generate", "sample_next"]


def _check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    check_float("temperature", temperature, 0)  # 0 = greedy
    check_float("top_p", top_p, 0, 1, open_low=True)
    check_int("max_new_tokens", max_new_tokens, 0)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row: argmax at temperature 0, else nucleus sampling.

    Args:
        logits_BV: (B, V) float logits of the next position.
        temperature: 0 for greedy; otherwise logits are divided by it.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
        generator: optional torch.Generator for reproducible sampling.
    Returns:
        (B, 1) int64 token ids.
    """
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs_BV.sort(dim=-1, descending=True)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order, sorted_p)
    return torch.multinomial(probs_BV, 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, generator: torch.Generator | None = None,
             eos_id: int | None = None) -> torch.Tensor:
    """Continue each prompt by up to `max_new_tokens` tokens, one cached forward per token.

    Args:
        model: the decoder (put in eval mode here).
        input_ids: (B, S) int64 prompt ids, S >= 1.
        max_new_tokens: tokens to add; prompt + new must fit in model.config.max_seq_len.
        temperature, top_p, generator: see `sample_next`.
        eos_id: stop once every row has produced this id.
    Returns:
        (B, S + n) int64 prompt followed by n <= max_new_tokens generated ids.
    """
    _check_sampling(temperature, top_p, max_new_tokens)
    idx_BS = input_ids
    if idx_BS.dim() != 2 or idx_BS.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, prompt_len >= 1), got shape {tuple(idx_BS.shape)}")
    total = idx_BS.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({idx_BS.shape[1]} tokens) + max_new_tokens={max_new_tokens} = {total} exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    model.eval()
    cache = model.new_cache(idx_BS.shape[0], max_len=total)
    out, step_input = idx_BS, idx_BS  # prefill the whole prompt, then one token at a time
    done = torch.zeros(idx_BS.shape[0], dtype=torch.bool, device=idx_BS.device)
    layer_k = model.layer_k()  # the budget's k_l depend on the weights only: once, not every step
    for _ in range(max_new_tokens):
        logits_BV = model(step_input, cache=cache, last_only=True, measure=False, layer_k=layer_k).logits[:, -1]
        step_input = sample_next(logits_BV, temperature, top_p, generator)
        out = torch.cat([out, step_input], dim=1)
        if eos_id is not None:
            done |= step_input.squeeze(1) == eos_id
            if bool(done.all()):
                break
    return out
