"""Activation memory kept for backward, with and without train.activation_checkpointing, and the step time.

Memory is counted exactly, not sampled: a saved-tensors hook sums the bytes of every tensor autograd keeps for
backward during one training forward (distinct storages once, parameters and buffers excluded). Under non-reentrant checkpointing the outer hook
sees only what the checkpoints keep (each block's inputs); the recomputation in backward keeps its activations
one block at a time. Time: forward + backward of the same batch, the two variants interleaved, median of repeats.

Run: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_activation_checkpointing.py [--preset demo/softmoe]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from softmoe.model import GPT
from softmoe.train.config import load_run_config


def saved_bytes(model: GPT, idx: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one forward: each storage once, parameters and buffers left out
    (they are held anyway)."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(idx, torch.roll(idx, -1, 1), return_logits=False)
    out.objective.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def step_seconds(model: GPT, idx: torch.Tensor) -> float:
    start = time.perf_counter()
    model(idx, torch.roll(idx, -1, 1), return_logits=False).objective.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo/softmoe")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = load_run_config(args.preset).model
    torch.manual_seed(0)
    models = {flag: GPT(config, activation_checkpointing=flag).train() for flag in (False, True)}
    models[True].load_state_dict(models[False].state_dict())
    idx = torch.randint(0, config.vocab_size, (args.batch, config.max_seq_len))
    memory = {flag: saved_bytes(model, idx) for flag, model in models.items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    for flag, model in models.items():
        step_seconds(model, idx)  # warm-up
    for _ in range(args.repeats):
        for flag, model in models.items():
            times[flag].append(step_seconds(model, idx))
    median = {flag: statistics.median(t) for flag, t in times.items()}
    print(f"preset {args.preset}: batch {args.batch} x {config.max_seq_len} tokens, {config.n_layers} blocks, "
          f"{torch.get_num_threads()} threads, fp32")
    print(f"saved for backward: plain {memory[False] / 2**20:.1f} MiB, checkpointed {memory[True] / 2**20:.1f} MiB "
          f"(ratio {memory[True] / memory[False]:.3f})")
    print(f"forward + backward: plain {median[False]:.3f} s, checkpointed {median[True]:.3f} s "
          f"(ratio {median[True] / median[False]:.2f}, median of {args.repeats})")


if __name__ == "__main__":
    main()
