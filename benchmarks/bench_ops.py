"""Soft top-k (LapSum) forward+backward vs hard top-k routing, and vs gmum/LapSum's C++ CPU op, in the same run.

Hard routing = torch.topk + softmax over the chosen scores + scatter into a dense [T, E] mask,
forward and backward through the softmax: what a top-k router costs before dispatch.

gmum = the CPU op of the LapSum authors' repository (github.com/gmum/LapSum, `lapsum/topk/cpu/soft_topk.cpp`),
built from a local checkout with torch's cpp_extension when `--lapsum PATH` is given (its forward and vjp,
called through a small autograd wrapper here); without a checkout that column is skipped. Its p is checked
against ours before timing.

`--modes eager compile` also times SOFTMOE_LAPSUM=compile (the solver's row passes compiled by torch.compile;
its first call compiles, outside the timing) in the same interleaved run.

Run:
    .venv/bin/python benchmarks/bench_ops.py                         # every E at alpha 1 and 0.1, one thread
    .venv/bin/python benchmarks/bench_ops.py --lapsum /path/to/LapSum --json
    .venv/bin/python benchmarks/bench_ops.py --tokens 65536 --experts 64 8 --alphas 1.0 --modes eager compile
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.timing import time_interleaved, timing_dict, write_json  # noqa: E402
from softmoe.ops import soft_topk  # noqa: E402

EXPERTS = (8, 16, 32, 64, 128, 256)
ALPHAS = (1.0, 0.1)
MAX_RATIO = 1.5  # the target: ours / hard at every shape


def default_tokens(experts: int) -> int:
    """T of the target table: 65536 tokens, 16384 from E = 128 on (4M entries at E = 256)."""
    return 16384 if experts >= 128 else 65536


def hard_topk_routing(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """(T, E) dense routing weights: softmax over the top-k scores, zeros elsewhere."""
    top_scores, top_idx = scores_TE.topk(k, dim=-1)
    return torch.zeros_like(scores_TE).scatter(-1, top_idx, torch.softmax(top_scores, dim=-1))


def build_gmum(checkout: str):
    """gmum/LapSum's CPU soft top-k extension, compiled from `checkout` (cached by torch in its build dir)."""
    from torch.utils.cpp_extension import load

    source = Path(checkout) / "lapsum" / "lapsum" / "topk" / "cpu" / "soft_topk.cpp"
    if not source.is_file():
        raise FileNotFoundError(f"--lapsum {checkout}: no {source.relative_to(checkout)} in it")
    return load(name="gmum_lapsum_soft_topk_cpu", sources=[str(source)], extra_cflags=["-O3"], verbose=False)


class _GmumSoftTopK(torch.autograd.Function):
    """p = gmum's soft top-k of (T, E) scores with one k per row (its forward and vjp kernels, nothing else).

    Its kernel reads a negative alpha as "largest", as its own Python wrapper passes it.
    """

    @staticmethod
    def forward(ctx, ext, scores_TE, k_T1, alpha: float):
        threshold_T1, prob_T1E = ext.forward(scores_TE.contiguous(), k_T1.contiguous(), -abs(alpha))
        ctx.save_for_backward(scores_TE, threshold_T1)
        ctx.ext, ctx.alpha = ext, -abs(alpha)
        return prob_T1E.squeeze(1)

    @staticmethod
    def backward(ctx, grad_TE):
        scores_TE, threshold_T1 = ctx.saved_tensors
        grad_scores, _, _ = ctx.ext.vjp(scores_TE, threshold_T1, grad_TE.unsqueeze(1).contiguous(), ctx.alpha)
        return None, grad_scores, None, None


def gmum_soft_topk(ext, scores_TE: torch.Tensor, k: float, alpha: float) -> torch.Tensor:
    k_T1 = scores_TE.new_full((scores_TE.shape[0], 1), k)
    return _GmumSoftTopK.apply(ext, scores_TE, k_T1, alpha)


def fwd_bwd(fn, scores_TE: torch.Tensor, grad_TE: torch.Tensor):
    def run():
        scores_TE.grad = None
        fn(scores_TE).backward(grad_TE)

    return run


def with_mode(mode: str, fn):
    """fn run with SOFTMOE_LAPSUM=mode."""
    def run(scores):
        before = os.environ.get("SOFTMOE_LAPSUM")
        os.environ["SOFTMOE_LAPSUM"] = mode
        try:
            return fn(scores)
        finally:
            os.environ.pop("SOFTMOE_LAPSUM") if before is None else os.environ.__setitem__("SOFTMOE_LAPSUM", before)
    return run


def bench_shape(tokens: int, experts: int, k: int, alpha: float, repeats: int, modes: tuple[str, ...] = ("eager",),
                gmum=None) -> dict:
    """One row: every candidate's fwd+bwd timing on the same (tokens, experts) scores, and the ratios to hard."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(tokens, experts, generator=gen).requires_grad_()
    grad = torch.randn(tokens, experts, generator=gen)
    soft = {("soft_topk" if mode == "eager" else f"soft_topk_{mode}"):
            with_mode(mode, lambda s: soft_topk(s, float(k), alpha)) for mode in modes}
    for fn in soft.values():  # a compiled mode compiles on its first call: not timed
        fwd_bwd(fn, scores, grad)()
    candidates = {name: fwd_bwd(fn, scores, grad) for name, fn in soft.items()}
    candidates["hard_topk"] = fwd_bwd(lambda s: hard_topk_routing(s, k), scores, grad)
    gmum_error = None
    if gmum is not None:
        with torch.no_grad():
            diff = gmum_soft_topk(gmum, scores, k, alpha) - soft_topk(scores, float(k), alpha)
            gmum_error = float(diff.abs().max())
        candidates["gmum"] = fwd_bwd(lambda s: gmum_soft_topk(gmum, s, k, alpha), scores, grad)
    timings = time_interleaved(candidates, repeats=repeats)
    row = {"tokens": tokens, "experts": experts, "k": k, "alpha": alpha, "dtype": "float32",
           "gmum_max_abs_diff_p": gmum_error}
    hard = timings["hard_topk"].median
    for name, t in timings.items():
        row[name] = timing_dict(t)
        if name != "hard_topk":
            row[f"ratio_{name}"] = t.median / hard
    if "gmum" in timings:
        row["ours_over_gmum"] = timings["soft_topk"].median / timings["gmum"].median
    return row


def _ms(cell: dict) -> str:
    return f"{cell['median'] * 1e3:8.2f} ({(cell['q3'] - cell['q1']) * 1e3:5.2f})"


def print_table(rows: list[dict], names: list[str], k: int) -> None:
    print(f"forward+backward, fp32, k={k}, {torch.get_num_threads()} thread(s); median (IQR) ms; ratios to hard top-k")
    header = f"{'T':>6} {'E':>4} {'alpha':>5} " + " ".join(f"{n:>16}" for n in names)
    print(header + " " + " ".join(f"{'r_' + n.replace('soft_topk', 'ours'):>12}" for n in names if n != "hard_topk")
          + f" {'ours/gmum':>9}")
    for r in rows:
        cells = " ".join(_ms(r[n]) if n in r else f"{'-':>16}" for n in names)
        ratios = " ".join(f"{r[f'ratio_{n}']:>12.2f}" if f"ratio_{n}" in r else f"{'-':>12}"
                          for n in names if n != "hard_topk")
        vs = f"{r['ours_over_gmum']:>9.2f}" if "ours_over_gmum" in r else f"{'-':>9}"
        print(f"{r['tokens']:>6} {r['experts']:>4} {r['alpha']:>5g} {cells} {ratios} {vs}")


def targets(rows: list[dict]) -> dict:
    """Whether ours / hard <= MAX_RATIO at every row, and ours faster than gmum wherever it ran."""
    worst = max(rows, key=lambda r: r["ratio_soft_topk"])
    out = {"max_ratio": MAX_RATIO, "worst_ratio": worst["ratio_soft_topk"],
           "worst_at": [worst["tokens"], worst["experts"], worst["alpha"]],
           "ratio_met": all(r["ratio_soft_topk"] <= MAX_RATIO for r in rows)}
    vs = [r["ours_over_gmum"] for r in rows if "ours_over_gmum" in r]
    out["faster_than_gmum"] = all(v < 1 for v in vs) if vs else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/<name>.json")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--k", type=int, default=2, help="k for both (soft k is the same real number)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="T values (default: 65536, or 16384 at E >= 128)")
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"],
                        help="SOFTMOE_LAPSUM modes of the soft op to time (eager: the default CPU path)")
    parser.add_argument("--lapsum", default=None, help="a gmum/LapSum checkout: also time its C++ CPU op")
    parser.add_argument("--name", default="bench_ops", help="results file name (with --json)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = tuple(dict.fromkeys(["eager", *args.modes]))
    gmum = build_gmum(args.lapsum) if args.lapsum else None
    if gmum is None:
        print("gmum column skipped: no --lapsum checkout given")

    rows = []
    for experts in args.experts:
        for tokens in (args.tokens or [default_tokens(experts)]):
            for alpha in args.alphas:
                rows.append(bench_shape(tokens, experts, args.k, alpha, args.repeats, modes, gmum))
                print(f"  [T={tokens}, E={experts}, alpha={alpha:g}] ours / hard {rows[-1]['ratio_soft_topk']:.2f}",
                      flush=True)
    names = ["soft_topk"] + [f"soft_topk_{m}" for m in modes if m != "eager"] + ["hard_topk"]
    names += ["gmum"] if gmum is not None else []
    print_table(rows, names, args.k)
    met = targets(rows)
    print(f"target: ours / hard <= {MAX_RATIO} at every row: worst {met['worst_ratio']:.2f} at "
          f"[T, E, alpha] = {met['worst_at']} -> {'met' if met['ratio_met'] else 'MISSED'}")
    if met["faster_than_gmum"] is not None:
        print(f"target: ours faster than gmum at every row -> {'met' if met['faster_than_gmum'] else 'MISSED'}")
    if args.json:
        path = write_json(args.name, rows, {"targets": met, "modes": list(modes), "threads": torch.get_num_threads(),
                                            "command": "benchmarks/bench_ops.py " + " ".join(sys.argv[1:])})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
