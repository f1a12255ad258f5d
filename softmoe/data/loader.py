"""Fixed-length training windows drawn deterministically from (seed, step), and eval windows.

Shape legend:
    B   windows per batch (batch_size)
    T   tokens per window (seq_len)

`WindowLoader.batch(step)` is a pure function of (tokens, seq_len, batch_size, seed, step): it
keeps no state, so resuming needs only the next step to run (`state_dict` / `load_state_dict`
also record the settings to catch a resume on different data). Window starts come from a
SplitMix64 hash of (seed, step, row) in NumPy uint64 arithmetic, which, unlike a library RNG
stream, cannot change between NumPy or torch versions.

`eval_batches` walks a split with non-overlapping windows so that every target token is scored
exactly once; the last window is right-aligned and its already-scored targets are IGNORE_INDEX.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from softmoe.common.checks import check_int
from softmoe.common.constants import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "WindowLoader", "eval_batches", "window_offsets"]

# Targets equal to this are skipped by torch.nn.functional.cross_entropy's default ignore_index.
_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on a uint64 array (a bijective 64-bit mixer; wraps by design)."""
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def window_offsets(seed: int, step: int, batch_size: int, num_starts: int) -> np.ndarray:
    """Window start positions of one batch.

    Args:
        seed, step: non-negative ints below 2**63.
        batch_size: B.
        num_starts: number of valid starts (len(tokens) - seq_len).
    Returns:
        (B,) int64 offsets in [0, num_starts); modulo bias is below num_starts / 2**64.
    """
    key = _splitmix64(_splitmix64(np.array([seed], dtype=_U64)) ^ np.array([step], dtype=_U64))
    with np.errstate(over="ignore"):
        rows = _splitmix64(key + np.arange(batch_size, dtype=_U64))
    return (rows % _U64(num_starts)).astype(np.int64)


def _check_int(name: str, value: object, low: int, high: int = 2**63 - 1) -> None:
    check_int(name, value, low, high)


def _check_tokens(tokens: object, seq_len: int) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be a 1-D integer np.ndarray, got {type(tokens).__name__}")
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(
            f"tokens has {tokens.shape[0]} tokens; seq_len={seq_len} needs at least {seq_len + 1}"
        )


def _gather(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tokens[offsets[:, None] + np.arange(seq_len + 1)].astype(np.int64)  # (B, T + 1)
    rows_t = torch.from_numpy(rows)
    # clone, not contiguous(): with one row both slices are already contiguous views of the same
    # memory, and masking targets (eval_batches) would then overwrite the inputs.
    return rows_t[:, :-1].clone(), rows_t[:, 1:].clone()


class WindowLoader:
    """Random fixed-length windows of a token stream, addressed by step.

    Args:
        tokens: (N,) integer array, typically the uint16 memmap from `load_split`.
        seq_len: T.
        batch_size: B.
        seed: sampling seed.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_tokens(tokens, seq_len)
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)

    @property
    def num_starts(self) -> int:
        """Valid window starts: a window needs seq_len + 1 tokens (inputs plus shifted targets)."""
        return self.tokens.shape[0] - self.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step`.

        Returns:
            idx_BT: (B, T) int64 input tokens.
            targets_BT: (B, T) int64, idx shifted left by one (targets_BT[:, t] = token after idx_BT[:, t]).
        """
        _check_int("step", step, 0)
        offsets_B = window_offsets(self.seed, int(step), self.batch_size, self.num_starts)
        return _gather(self.tokens, offsets_B, self.seq_len)

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (step, idx_BT, targets_BT) for start_step, start_step + 1, ...; resume state = next step."""
        _check_int("start_step", start_step, 0)
        step = int(start_step)
        while True:
            yield (step, *self.batch(step))
            step += 1

    def state_dict(self, next_step: int) -> dict:
        """Everything needed to resume exactly: the next step, plus settings to check on load."""
        _check_int("next_step", next_step, 0)
        return {"next_step": int(next_step), "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "num_tokens": int(self.tokens.shape[0])}

    def load_state_dict(self, state: dict) -> int:
        """Check a saved state matches this loader and return the step to continue from."""
        for key in ("seed", "seq_len", "batch_size", "num_tokens"):
            mine = self.state_dict(0)[key]
            if state.get(key) != mine:
                raise ValueError(f"loader state {key}={state.get(key)!r} does not match this loader's "
                                 f"{mine!r}")
        _check_int("next_step", state.get("next_step"), 0)
        return int(state["next_step"])


def num_eval_batches(num_tokens: int, seq_len: int, batch_size: int) -> int:
    """How many batches `eval_batches` yields for a split of `num_tokens` tokens."""
    windows = len(range(0, num_tokens - seq_len, seq_len))
    windows += int(num_tokens - 1 - windows * seq_len > 0)
    return -(-windows // batch_size)


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering a whole split, in order, for evaluation.

    Every one of the N - 1 targets (tokens[1:]) appears exactly once as a non-ignored target.
    Windows start at 0, T, 2T, ...; if targets remain, a final window ending at the last token is
    added and its targets already covered are set to IGNORE_INDEX.

    Yields:
        idx_BT, targets_BT: (b, T) int64 with b = batch_size except possibly in the last batch.
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("batch_size", batch_size, 1)
    _check_tokens(tokens, seq_len)
    n = tokens.shape[0]
    starts = np.arange(0, n - seq_len, seq_len, dtype=np.int64)
    covered = starts.shape[0] * seq_len  # targets 1..covered are scored by full windows
    tail = n - 1 - covered
    if tail > 0:
        starts = np.append(starts, n - 1 - seq_len)
    for i in range(0, starts.shape[0], batch_size):
        idx_BT, targets_BT = _gather(tokens, starts[i : i + batch_size], seq_len)
        if tail > 0 and i + batch_size >= starts.shape[0]:
            targets_BT[-1, : seq_len - tail] = IGNORE_INDEX
        yield idx_BT, targets_BT
