"""Learning-rate schedule: linear warmup, then cosine decay to a floor. A pure function of the step.

Because the rate is recomputed from the step every time, the "scheduler state" of a checkpoint is
just the step, and resuming cannot drift.
"""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps (never exactly 0).
    Then cosine from lr down to lr * min_lr_ratio at step total_steps - 1, constant after.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
