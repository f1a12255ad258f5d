"""Operators and host syncs per KV-cache decode step: the fixed cost that bounds decode on a GPU.

On an H100 (docs/benchmarks.md, "On an H100") a decode step of bench_infer's model costs ~2.2 ms per MoE layer
whatever the active experts: at batch 1 the GPU waits on kernel launches, one per operator, and on host syncs.
This script counts both, exactly and without a GPU: every aten operator one decode step dispatches (a
TorchDispatchMode), attributed to the softmoe file that issued it, and the operators that read a value back to
the host, as tests/reference/sync_counter.py counts them for the suite's sync budgets (`_local_scalar_dense`:
.item(), int(), bool() of a tensor; `nonzero`, `bincount` and others whose output size needs one; `Tensor.tolist`).
Counts, not times: they are the same on any machine, and each operator is at least one kernel launch on CUDA.

The CPU runs paths a GPU does not (the float32 soft top-k solver `ops/lapsum_fast.py`, the finite-value checks,
the per-token gather table), so the host syncs counted here include CPU-only ones; the "on CUDA" column
counts only the syncs in code that also runs there (everything outside those CPU-only files and functions). The
expert bank also differs (CPU: `padded`; CUDA: `grouped` in bf16, no sync, or the per-expert `loop` in fp32, one
`tolist`), so that column is the CPU expert bank's count.

Run:
    .venv/bin/python benchmarks/decode_ops.py               # bench_infer's model (4 MoE blocks of 32 experts)
    .venv/bin/python benchmarks/decode_ops.py --quick       # the tiny model (the suite's smoke test)
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_infer import base_config, build_models  # noqa: E402
from tests.reference.sync_counter import SyncCounter  # noqa: E402

# Code that a CUDA run does not take (see the module docstring): (file suffix, function name or None for all).
# The value checks (SOFTMOE_CHECKS, softmoe/ops/checks.py) are on by default on the CPU and off on GPUs.
CPU_ONLY = (("ops/lapsum_fast.py", None), ("ops/lapsum.py", "_check_scores"), ("ops/lapsum.py", "_check_alpha"),
            ("ops/lapsum.py", "_check_k"), ("layers/moe.py", "token_slots"), ("routing/base.py", "router_logits"))


def _softmoe_sites(stack) -> list[tuple[str, str]]:
    """(file under softmoe/, function) of the softmoe frames of a stack, outermost first."""
    return [(f.filename.split("softmoe/")[-1], f.name) for f in stack if "/softmoe/" in f.filename]


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched inside it, by (softmoe file, function)."""

    def __init__(self):
        super().__init__()
        self.by_site: collections.Counter = collections.Counter()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        sites = _softmoe_sites(traceback.extract_stack())
        self.by_site[sites[-1] if sites else ("(other)", "")] += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class StepCount:
    ops: OpCounter
    syncs: collections.Counter  # "cuda" (code a GPU run takes too) / "cpu-only" -> host syncs


def _cpu_only(site: tuple[str, str]) -> bool:
    return any(site[0].endswith(path) and (name is None or site[1] == name) for path, name in CPU_ONLY)


@torch.no_grad()
def count_decode_step(model, prompt_BS: torch.Tensor, measure: bool = False) -> StepCount:
    """The operators and host syncs (tests/reference/sync_counter.py) of one decode step (one new token per row)
    after `prompt_BS` filled the cache, as `generate` runs it (measure=False: no aux losses or routing
    statistics) or measured (measure=True)."""
    cache = model.new_cache(prompt_BS.shape[0], prompt_BS.shape[1] + 1)
    model(prompt_BS, cache=cache, last_only=True)
    layer_k = None if measure else model.layer_k()  # generate computes the budget's k_l once, before its steps
    with SyncCounter(stacks=True) as syncs, OpCounter() as ops:
        model(prompt_BS[:, -1:], cache=cache, last_only=True, measure=measure, layer_k=layer_k)
    where = collections.Counter("cpu-only" if any(_cpu_only(s) for s in _softmoe_sites(stack)) else "cuda"
                                for stack in syncs.stacks)
    return StepCount(ops, where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sites", type=int, default=12, help="top operator sites listed per variant")
    args = parser.parse_args(argv)
    config = base_config(args.quick)
    models = build_models(config, gate_std=1.0, topk=(1, 2))
    prompt = torch.randint(0, config.vocab_size, (args.batch, 8), generator=torch.Generator().manual_seed(0))
    counts = {name: count_decode_step(model, prompt) for name, model in models.items()}
    measured = {name: count_decode_step(model, prompt, measure=True) for name, model in models.items()}
    moe_layers = sum(b.is_moe for b in models["softmoe"].blocks)
    dense = counts["dense"].ops.total
    print(f"{config.n_layers} blocks ({moe_layers} MoE, {config.num_experts} experts), batch {args.batch}, "
          f"one decode step as `generate` runs it (measure=False); 'measured': the same step with the routers'"
          f" aux losses and statistics (measure=True)")
    print("| variant | operators | per MoE layer over dense | measured: operators | host syncs (on CUDA too) "
          "| host syncs (CPU-only) |")
    print("|---|---|---|---|---|---|")
    for name, c in counts.items():
        extra = "-" if name == "dense" else f"{(c.ops.total - dense) / moe_layers:.0f}"
        print(f"| {name} | {c.ops.total} | {extra} | {measured[name].ops.total} | {c.syncs['cuda']} | "
              f"{c.syncs['cpu-only']} |")
    for name in ("top2", "softmoe"):
        print(f"\n{name}: operators by site (file, function), all layers")
        for (path, func), n in counts[name].ops.by_site.most_common(args.sites):
            print(f"  {n:5d}  {path} {func}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
