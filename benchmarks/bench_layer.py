"""MoE layer forward+backward: SoftMoE vs top-k at the same active experts, top-k's FLOP rate vs
dense matmuls of the same FLOPs, and top-k vs transformers' MixtralSparseMoeBlock (eager).

All candidates of one shape are timed in the same run, interleaved (benchmarks/timing.py).
Shapes: d_model 512, d_hidden 1024, E in {8, 64}, 8192 tokens, fp32 and bf16 autocast.

- SoftMoE's budget k_l is calibrated (bisection on the benchmark's own tokens) so its realized mean
  active experts m equals the top-k layer's k; the ratio compares equal expert work.
- "Useful FLOPs" of the top-k layer are its expert matmuls only: 3 passes (fwd + 2 bwd) x 2 x
  (T k) x 3 D H. The dense reference runs the same three matmul shapes on T k rows (a SwiGLU FFN),
  so the ratio of FLOP rates is what routing, gather/scatter and ragged matmuls cost.
- HF's block gets our top-k layer's weights and is checked to give the same output first.

Run:
    .venv/bin/python benchmarks/bench_layer.py            # table
    .venv/bin/python benchmarks/bench_layer.py --json     # also writes benchmarks/results/bench_layer.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.timing import time_interleaved, timing_dict, write_json  # noqa: E402
from softmoe.layers import MoELayer, MoEOutput, SwiGLU  # noqa: E402

D_MODEL, D_HIDDEN, TOKENS, K = 512, 1024, 8192, 2
TARGETS = {"softmoe_over_topk_max": 1.1, "flop_rate_fraction_min": 0.6, "speedup_vs_hf_min": 2.0}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def calibrate_mean_k(layer: MoELayer, x_TD: torch.Tensor, target: float, tol: float = 0.005) -> tuple[float, float]:
    """Bisection on k_l so the realized mean active experts on x_TD is within tol of target."""
    low, high = 0.05, layer.router.num_experts - 0.05
    with torch.no_grad():
        for _ in range(40):
            mid = 0.5 * (low + high)
            m = float(layer.router(x_TD, k=torch.tensor(mid, device=x_TD.device)).stats["active_experts_mean"])
            if abs(m - target) <= tol * target:
                return mid, m
            low, high = (mid, high) if m < target else (low, mid)
    return mid, m


def hf_mixtral_block(topk: MoELayer, k: int):
    """transformers' MixtralSparseMoeBlock (eager experts) holding `topk`'s weights; sizes read from its bank."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    num_experts, d_model, d_hidden = topk.experts.w_gate.shape
    config = MixtralConfig(hidden_size=d_model, intermediate_size=d_hidden, num_local_experts=num_experts,
                           num_experts_per_tok=k, router_jitter_noise=0.0)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    bank = topk.experts
    with torch.no_grad():
        block.gate.weight.copy_(topk.router.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([bank.w_gate, bank.w_up], dim=2).transpose(1, 2))
        block.experts.down_proj.copy_(bank.w_down.transpose(1, 2))
    return block


def fwd_bwd(module, x_BSD, grad_BSD, dtype, **kwargs):
    def run():
        module.zero_grad(set_to_none=True)
        x_BSD.grad = None
        with autocast(dtype):
            y = module(x_BSD, **kwargs)
        y, aux = (y.output, y.aux_loss) if isinstance(y, MoEOutput) else (y, 0.0)  # MoELayer returns MoEOutput
        loss = (y.float() * grad_BSD).sum() + aux
        loss.backward()

    return run


def bench_shape(num_experts: int, dtype_name: str, repeats: int, warmup: int) -> dict:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    x = torch.randn(1, TOKENS, D_MODEL, requires_grad=True)
    grad = torch.randn(1, TOKENS, D_MODEL)
    softmoe = MoELayer(D_MODEL, D_HIDDEN, num_experts, router="softmoe", k=float(K))
    topk = MoELayer(D_MODEL, D_HIDDEN, num_experts, router="topk", k=float(K), normalize=True)
    mean_k, m = calibrate_mean_k(softmoe, x.detach().reshape(-1, D_MODEL), float(K))
    hf = hf_mixtral_block(topk, K)
    dense = SwiGLU(D_MODEL, D_HIDDEN)
    x_dense = torch.randn(1, TOKENS * K, D_MODEL, requires_grad=True)
    grad_dense = torch.randn(1, TOKENS * K, D_MODEL)
    with torch.no_grad():
        hf_diff = float((hf(x) - topk(x).output).abs().max())

    timings = time_interleaved({
        "softmoe": fwd_bwd(softmoe, x, grad, dtype, mean_k=torch.tensor(mean_k)),
        "topk": fwd_bwd(topk, x, grad, dtype),
        "dense_same_flops": fwd_bwd(dense, x_dense, grad_dense, dtype),
        "hf_mixtral_eager": fwd_bwd(hf, x, grad, dtype),
    }, repeats=repeats, warmup=warmup)
    useful_flops = 3 * 2 * TOKENS * K * 3 * D_MODEL * D_HIDDEN
    med = {name: t.median for name, t in timings.items()}
    return {
        "experts": num_experts, "tokens": TOKENS, "d_model": D_MODEL, "d_hidden": D_HIDDEN, "k": K,
        "dtype": dtype_name, "softmoe_mean_k": mean_k, "softmoe_active_mean": m, "hf_max_abs_diff_fp32": hf_diff,
        "timings": {name: timing_dict(t) for name, t in timings.items()},
        "softmoe_over_topk": med["softmoe"] / med["topk"],
        "topk_gflops": useful_flops / med["topk"] / 1e9,
        "dense_gflops": useful_flops / med["dense_same_flops"] / 1e9,
        "flop_rate_fraction": med["dense_same_flops"] / med["topk"],
        "speedup_vs_hf": med["hf_mixtral_eager"] / med["topk"],
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'E':>3} {'dtype':>5} {'m':>5} {'softmoe s':>9} {'topk s':>7} {'soft/topk':>9} "
            f"{'topk GF/s':>9} {'dense GF/s':>10} {'rate':>5} {'HF s':>6} {'vs HF':>6}")
    print(head)
    for r in rows:
        t = r["timings"]
        print(f"{r['experts']:>3} {r['dtype']:>5} {r['softmoe_active_mean']:>5.2f} {t['softmoe']['median']:>9.3f} "
              f"{t['topk']['median']:>7.3f} {r['softmoe_over_topk']:>9.3f} {r['topk_gflops']:>9.1f} "
              f"{r['dense_gflops']:>10.1f} {r['flop_rate_fraction']:>5.2f} {t['hf_mixtral_eager']['median']:>6.3f} "
              f"{r['speedup_vs_hf']:>6.2f}")
    print(f"targets: soft/topk <= {TARGETS['softmoe_over_topk_max']}, rate >= {TARGETS['flop_rate_fraction_min']}, "
          f"vs HF >= {TARGETS['speedup_vs_hf_min']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/bench_layer.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args(argv)
    rows = []
    for num_experts in args.experts:
        for dtype_name in args.dtypes:
            rows.append(bench_shape(num_experts, dtype_name, args.repeats, args.warmup))
            print_table(rows[-1:])
    print()
    print_table(rows)
    if args.json:
        path = write_json("bench_layer", rows, extra={"command": "benchmarks/bench_layer.py " + " ".join(argv or sys.argv[1:]),
                                                      "targets": TARGETS})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
