"""The device benchmark of benchmarks/gpu_check.sh: op, layer and end-to-end training on one device.

Three parts, each timed with benchmarks/timing.py (interleaved repeats, medians, ratios from the same run):

    ops    soft top-k forward+backward: the fused Triton kernel (CUDA only), the eager op, and hard top-k
           routing (torch.topk + softmax + scatter, benchmarks/bench_ops.py), tokens x experts;
    layer  one MoE layer forward+backward under bf16 autocast: SoftMoE with its k_l calibrated to the top-k
           layer's active experts (equal AE), top-k, and transformers' MixtralSparseMoeBlock holding the top-k
           layer's weights (skipped with the reason when transformers lacks it);
    train  `Trainer.train_step` of the small presets (softmoe, topk, dense) on the tiny fixture corpus (no
           download): tokens/s and model FLOPs utilisation (benchmarks/bench_train.py's FLOP count) against the
           bf16 matmul rate measured on the same device in the same run.

Writes <out>/bench_gpu.json and <out>/bench_gpu.md. `--quick` shrinks every part to seconds (tiny shapes, the
tiny presets), so the script can be checked on a CPU (tests/unit/test_bench_gpu.py does).

Run:
    python3 benchmarks/bench_gpu.py --device cuda --out gpu_results        # ~4 min on one H100/H200
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick --out /tmp/bench_gpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_layer import calibrate_mean_k, hf_mixtral_block  # noqa: E402
from benchmarks.bench_ops import hard_topk_routing  # noqa: E402
from benchmarks.timing import machine_info, sync, time_interleaved, timing_dict  # noqa: E402
from softmoe.common.precision import resolve_device  # noqa: E402

FULL = {"tokens": (65536, 262144, 1048576), "experts": (8, 32, 64, 256), "op_repeats": 10,
        "layer": {"d_model": 1024, "d_hidden": 1024, "tokens": 16384, "experts": (8, 64), "k": 2, "repeats": 10},
        "train": {"presets": ("small/softmoe", "small/topk", "small/dense"), "batch_size": 64, "warmup": 3,
                  "steps": 10}, "matmul": 8192}
QUICK = {"tokens": (2048,), "experts": (8, 64), "op_repeats": 3,
         "layer": {"d_model": 64, "d_hidden": 64, "tokens": 512, "experts": (8,), "k": 2, "repeats": 3},
         "train": {"presets": ("tiny/softmoe", "tiny/topk"), "batch_size": 8, "warmup": 1, "steps": 2},
         "matmul": 512}
# bf16 dense peak of the chips the GPU check is meant for (NVIDIA's spec sheets, SXM, no sparsity).
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12}


@contextlib.contextmanager
def lapsum_mode(mode: str):
    """SOFTMOE_LAPSUM=mode (softmoe/ops/lapsum_triton.py) for the calls inside."""
    before = os.environ.get("SOFTMOE_LAPSUM")
    os.environ["SOFTMOE_LAPSUM"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SOFTMOE_LAPSUM", None)
        else:
            os.environ["SOFTMOE_LAPSUM"] = before


def triton_usable(device: torch.device) -> bool:
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------- ops

def bench_op(tokens: int, experts: int, k: int, device: torch.device, repeats: int) -> dict:
    from softmoe.ops import soft_topk

    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(tokens, experts, device=device, generator=gen).requires_grad_()
    grad = torch.randn(tokens, experts, device=device, generator=gen)
    k_t = torch.tensor(float(k), device=device)

    def run(fn, mode=None):
        def call():
            scores.grad = None
            with lapsum_mode(mode) if mode else contextlib.nullcontext():
                fn(scores).backward(grad)
        return call

    candidates = {"eager": run(lambda s: soft_topk(s, k_t, 1.0), "eager"),
                  "hard_topk": run(lambda s: hard_topk_routing(s, k))}
    if triton_usable(device):
        candidates["fused"] = run(lambda s: soft_topk(s, k_t, 1.0), "triton")
    timings = time_interleaved(candidates, repeats=repeats, warmup=2)
    row = {"tokens": tokens, "experts": experts, "k": k, "ms": {n: t.median * 1e3 for n, t in timings.items()},
           "timings": {n: timing_dict(t) for n, t in timings.items()}}
    for name in ("fused", "eager"):
        if name in timings:
            row[f"{name}_over_hard"] = timings[name].median / timings["hard_topk"].median
    return row


# ---------------------------------------------------------------- layer

def bench_layer(spec: dict, experts: int, device: torch.device) -> dict:
    from softmoe.layers import MoELayer

    d, h, t, k = spec["d_model"], spec["d_hidden"], spec["tokens"], spec["k"]
    torch.manual_seed(0)
    x = torch.randn(1, t, d, device=device, requires_grad=True)
    grad = torch.randn(1, t, d, device=device)
    softmoe = MoELayer(d, h, experts, router="softmoe", k=float(k)).to(device)
    topk = MoELayer(d, h, experts, router="topk", k=float(k), normalize=True).to(device)
    mean_k, active = calibrate_mean_k(softmoe, x.detach().reshape(-1, d), float(k))
    mean_k_t = torch.tensor(mean_k, device=device)

    def fwd_bwd(module, **kwargs):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = module(x, **kwargs)
            # MoELayer returns MoEOutput (output, aux_loss, ...); transformers' blocks a tensor or a tuple.
            aux = getattr(y, "aux_loss", 0.0)
            y = y[0] if isinstance(y, tuple) else y
            ((y.float() * grad).sum() + aux).backward()
        return run

    # The same SoftMoE layer with a static dispatch size (no host sync): the cap bounds the paper's rule's
    # ceil(k_l * cap_factor) experts per token.
    cap = min(experts, math.ceil(mean_k * softmoe.router.config.cap_factor))
    static = MoELayer(d, h, experts, router="softmoe", k=float(k), dispatch_cap=cap).to(device)
    static.load_state_dict(softmoe.state_dict())
    candidates = {"softmoe": fwd_bwd(softmoe, mean_k=mean_k_t), "topk": fwd_bwd(topk),
                  "softmoe_static": fwd_bwd(static, mean_k=mean_k_t)}
    # At init the paper's relative truncation keeps ~1 expert per token whatever k_l (near-uniform p): when the
    # calibration cannot reach k, top-k at the realized AE (rounded) is the equal-work comparison.
    k_equal = max(1, round(active))
    if k_equal != k:
        topk_equal = MoELayer(d, h, experts, router="topk", k=float(k_equal), normalize=True).to(device)
        candidates[f"topk_k{k_equal}"] = fwd_bwd(topk_equal)
    hf_note = None
    try:
        hf = hf_mixtral_block(topk, k).to(device)
        candidates["hf_mixtral"] = fwd_bwd(hf)
    except Exception as err:  # an optional comparison: any failure is reported, not fatal
        hf_note = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    timings = time_interleaved(candidates, repeats=spec["repeats"], warmup=2)
    med = {name: t.median for name, t in timings.items()}
    row = {"experts": experts, "tokens": t, "d_model": d, "d_hidden": h, "k": k, "softmoe_mean_k": mean_k,
           "softmoe_active_mean": active, "ms": {n: v * 1e3 for n, v in med.items()},
           "timings": {n: timing_dict(t) for n, t in timings.items()}, "softmoe_over_topk": med["softmoe"] / med["topk"],
           "static_dispatch_cap": cap, "softmoe_static_over_softmoe": med["softmoe_static"] / med["softmoe"]}
    if "hf_mixtral" in med:
        row["hf_over_topk"] = med["hf_mixtral"] / med["topk"]
    if k_equal != k:
        row["softmoe_over_topk_equal_ae"] = med["softmoe"] / med[f"topk_k{k_equal}"]
        row["topk_equal_ae_k"] = k_equal
    if hf_note:
        row["hf_mixtral_skipped"] = hf_note
    return row


# ---------------------------------------------------------------- train

def matmul_rate(device: torch.device, size: int, calls: int = 10) -> float:
    """bf16 FLOP/s of a size^3 matmul on `device` (mean of `calls` after a warm-up)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    tic = time.perf_counter()
    for _ in range(calls):
        a @ b
    sync(device)
    return 2.0 * size ** 3 * calls / (time.perf_counter() - tic)


def train_config(preset: str, spec: dict, device: torch.device, compile_model: bool):
    """The preset's run config on the tiny fixture corpus (no download) in a fresh temporary folder. One validation
    batch: the fixture's val split holds fewer windows than the presets' eval_batches x batch_size, and the
    benchmark times training steps only."""
    from softmoe.train.config import load_run_config

    out_dir = tempfile.mkdtemp(prefix="bench_gpu_")
    return load_run_config(ROOT / "configs" / f"{preset}.yaml", [
        f"train.out_dir={out_dir}", f"data.data_dir={out_dir}/data", "data.corpus=tiny", "train.progress=false",
        "train.tensorboard=false", f"train.device={device}", "train.precision=bf16", "train.threads=0",
        f"data.batch_size={spec['batch_size']}", f"train.compile={str(compile_model).lower()}",
        "train.eval_batches=1"])


def bench_train(preset: str, spec: dict, device: torch.device, peak: float, compile_model: bool) -> dict:
    from benchmarks.bench_train import model_flops_per_token
    from softmoe.train.loop import Trainer

    trainer = Trainer(train_config(preset, spec, device, compile_model), report=lambda message: None)
    config = trainer.config
    tokens = trainer.data.tokens_per_batch * config.train.grad_accum
    warmup, steps = spec["warmup"], spec["steps"]
    compile_tic = time.perf_counter()
    for step in range(warmup):
        trainer.train_step(step, summarize=False)
    sync(device)
    warmup_s = time.perf_counter() - compile_tic
    times, active = [], []
    for step in range(warmup, warmup + steps):
        tic = time.perf_counter()
        stats = trainer.train_step(step, summarize=step == warmup + steps - 1)
        sync(device)
        times.append(time.perf_counter() - tic)
        if stats.layers:
            active = [layer["active_experts_mean"] for layer in stats.layers if "active_experts_mean" in layer]
    step_s = statistics.median(times)
    flops = model_flops_per_token(trainer.model, config.data.seq_len, active)
    return {"preset": preset, "compile": compile_model, "tokens_per_step": tokens, "step_ms": step_s * 1e3,
            "tok_s": tokens / step_s, "warmup_s": warmup_s, "model_flops_per_token": flops["train"],
            "mfu": flops["train"] * tokens / step_s / peak, "active_experts": active,
            "params": trainer.model.num_params()}


# ---------------------------------------------------------------- report

def markdown(result: dict) -> str:
    lines = [f"# bench_gpu on {result['machine'].get('cuda') or result['machine']['cpu']} ({result['device']})", "",
             f"torch {result['machine']['torch']}; command: `{result['command']}`; medians of interleaved repeats.", ""]
    if result.get("ops"):
        lines += ["## soft top-k forward+backward (ms) vs hard top-k routing", "",
                  "| tokens | E | fused | eager | hard top-k | fused / hard | eager / hard |", "|---|---|---|---|---|---|---|"]
        for r in result["ops"]:
            ms = r["ms"]
            lines.append(f"| {r['tokens']} | {r['experts']} | {ms.get('fused', float('nan')):.3f} | {ms['eager']:.3f} | "
                         f"{ms['hard_topk']:.3f} | {r.get('fused_over_hard', float('nan')):.2f} | "
                         f"{r['eager_over_hard']:.2f} |")
        lines.append("")
    if result.get("layer"):
        lines += ["## MoE layer forward+backward, bf16 autocast (ms)", "",
                  "| E | tokens | D | H | SoftMoE AE | SoftMoE | SoftMoE static (cap) | top-k | HF Mixtral | "
                  "SoftMoE / top-k | static / exact | HF / top-k | SoftMoE / top-k at its AE |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["layer"]:
            ms = r["ms"]
            equal = r.get("softmoe_over_topk_equal_ae")
            equal_cell = "-" if equal is None else f"{equal:.2f} (k={r['topk_equal_ae_k']})"
            lines.append(f"| {r['experts']} | {r['tokens']} | {r['d_model']} | {r['d_hidden']} | "
                         f"{r['softmoe_active_mean']:.2f} | {ms['softmoe']:.2f} | "
                         f"{ms['softmoe_static']:.2f} ({r['static_dispatch_cap']}) | {ms['topk']:.2f} | "
                         f"{ms.get('hf_mixtral', float('nan')):.2f} | {r['softmoe_over_topk']:.2f} | "
                         f"{r['softmoe_static_over_softmoe']:.2f} | "
                         f"{r.get('hf_over_topk', float('nan')):.2f} | "
                         f"{equal_cell} |")
        lines.append("")
    if result.get("train"):
        lines += [f"## training step, bf16 (matmul peak measured: {result['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s)", "",
                  "| preset | compile | tokens/step | step ms | tok/s | MFU (measured peak) | MFU (nominal) |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["train"]:
            nominal = r.get("mfu_nominal")
            lines.append(f"| {r['preset']} | {r['compile']} | {r['tokens_per_step']} | {r['step_ms']:.1f} | "
                         f"{r['tok_s']:.0f} | {r['mfu']:.3f} | {'-' if nominal is None else f'{nominal:.3f}'} |")
        lines.append("")
    for part, error in result.get("errors", {}).items():
        lines += [f"**{part} failed**: `{error}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<index>")
    parser.add_argument("--out", type=Path, required=True, help="folder for bench_gpu.json and bench_gpu.md")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and presets (a smoke test, any device)")
    parser.add_argument("--parts", default="ops,layer,train", help="comma-separated: ops, layer, train")
    parser.add_argument("--compile", action="store_true", help="also time the SoftMoE preset with train.compile=true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, "--device")
    spec = QUICK if args.quick else FULL
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - {"ops", "layer", "train"})
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": str(device), "quick": args.quick, "machine": machine_info(),
              "command": "benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "errors": {}}

    def part(name, fn):
        if name not in parts:
            return
        tic = time.perf_counter()
        try:
            fn()
        except Exception:  # one part failing must not lose the others' numbers
            result["errors"][name] = traceback.format_exc(limit=4)[-1500:]
            print(f"{name} FAILED:\n{result['errors'][name]}", flush=True)
        print(f"{name}: {time.perf_counter() - tic:.0f} s", flush=True)
        _write(args.out, result)

    def ops():
        result["ops"] = []
        for tokens in spec["tokens"]:
            for experts in spec["experts"]:
                result["ops"].append(bench_op(tokens, experts, 2, device, spec["op_repeats"]))
                print(json.dumps({k: v for k, v in result["ops"][-1].items() if k != "timings"}), flush=True)

    def layer():
        result["layer"] = []
        for experts in spec["layer"]["experts"]:
            result["layer"].append(bench_layer(spec["layer"], experts, device))
            print(json.dumps({k: v for k, v in result["layer"][-1].items() if k != "timings"}), flush=True)

    def train():
        peak = matmul_rate(device, spec["matmul"])
        result["matmul_bf16_flops"] = peak
        nominal = next((v for name, v in NOMINAL_BF16_PEAK.items() if name in (result["machine"].get("cuda") or "")),
                       None)
        result["train"] = []
        runs = [(preset, False) for preset in spec["train"]["presets"]]
        if args.compile:
            runs.append((spec["train"]["presets"][0], True))
        for preset, compiled in runs:
            row = bench_train(preset, spec["train"], device, peak, compiled)
            if nominal:
                row["mfu_nominal"] = row["mfu"] * peak / nominal
            result["train"].append(row)
            print(json.dumps(row), flush=True)

    part("ops", ops)
    part("layer", layer)
    part("train", train)
    json_path, md_path = _write(args.out, result)
    print(f"wrote {json_path} and {md_path}")
    return 1 if result["errors"] else 0


def _write(out: Path, result: dict) -> tuple[Path, Path]:
    json_path, md_path = out / "bench_gpu.json", out / "bench_gpu.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result) + "\n")
    return json_path, md_path


if __name__ == "__main__":
    sys.exit(main())
