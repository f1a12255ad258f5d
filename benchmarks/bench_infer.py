"""Inference speed against realized active experts (AE): prefill and KV-cache decode, native and through transformers.

Models (one architecture, random init: speed does not depend on training): a decoder whose expert FFNs dominate
the FLOPs (default d_model 512, 4 blocks, 32 SwiGLU experts of width 2048 per block, vocabulary 4096), as
    dense      one SwiGLU of an expert's width per block (the FLOPs of top-1)
    top1..4    top-k routing (k = 1, 2, 3, 4)
    softmoe@A  SoftMoE (the paper's rule, K = 2, cap m = 4) with its routers' relative `threshold` buffer set by
               bisection on the prompts so the realized AE is about A (1.0, 1.4, 2, 3)
Every variant shares the same embedding, attention and expert weights (and the same gate weights), so they differ
only in routing. The gate is scaled so its logits have std ~1 (a trained router's spread; at init they are
flatter and every token keeps one expert).

Measured per variant, interleaved repeat by repeat in one process (the box is shared; ratios are the claims):
    prefill    one forward over B_p x S_p prompt tokens with a fresh KV cache: tokens/s
    decode     `generate` of N new tokens at batch 1 (N = 32) and 32 (N = 8), greedy; per step (t(N + 1) - t(1)) / N,
               so the prompt's prefill cancels; tokens/s = batch / that
for the native model (`softmoe.model.generate`) and for the exported transformers model
(`SoftMoEForCausalLM.generate`, softmoe/export/hf.py; skipped with --no-hf). The realized AE is measured on the
decoded tokens (an untimed run). Then, per path and measurement, time per token t against AE: a least-squares
line over the top-k variants and one over the SoftMoE ones (slope = cost per active expert, intercept = the fixed
cost), and SoftMoE / top-k at equal AE = t_softmoe / (top-k's line at SoftMoE's AE).
Targets: SoftMoE within 10 % of top-k at equal AE; at AE 1.4, decode tokens/s >= 1.25 x top-2's (SoftMoE's line
at AE 1.4, since a variant calibrated on one set of tokens realizes a slightly different AE on another). The
ceiling printed beside it is top-k's own line at AE 1.4 over top-2: what a router costing what top-k costs would
reach. With t = a + b AE, (a + 2b) / (a + 1.4b) >= 1.25 needs b >= a: one expert must cost at least the rest of
the step (attention, head, per-operator overhead); `--d-expert` widens the experts.

Run:
    .venv/bin/python benchmarks/bench_infer.py --json            # the documented run (5 repeats, ~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_infer.py --json --d-expert 4096 --name bench_infer_wide   # experts that dominate
    .venv/bin/python benchmarks/bench_infer.py --quick           # tiny sizes, seconds (the suite's smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.timing import sync, write_json  # noqa: E402
from softmoe.common.precision import resolve_device  # noqa: E402
from softmoe.model import GPT, ModelConfig  # noqa: E402
from softmoe.model.generate import generate  # noqa: E402
from softmoe.routing.softk import SoftKRouter  # noqa: E402

TOPK = (1, 2, 3, 4)
SOFT_AE = (1.0, 1.4, 2.0, 3.0)
TARGET_RATIO = 1.10  # SoftMoE / top-k time per token at equal AE
TARGET_SPEEDUP = 1.25  # SoftMoE at AE ~1.4 vs top-2, decode tokens/s


def base_config(quick: bool, d_expert: int = 2048) -> ModelConfig:
    if quick:
        return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=8, d_expert=32,
                           router="softmoe", k=2.0, max_seq_len=64)
    return ModelConfig(vocab_size=4096, d_model=512, n_layers=4, n_heads=8, d_ff=2048, num_experts=32,
                       d_expert=d_expert, router="softmoe", k=2.0, max_seq_len=256)


def build_models(config: ModelConfig, gate_std: float, topk=TOPK, seed: int = 0) -> dict[str, GPT]:
    """Every variant, sharing one set of weights (only the routers differ, and even their gate weights agree)."""
    torch.manual_seed(seed)
    soft = GPT(config).eval()
    with torch.no_grad():
        for block in soft.blocks:
            # RMSNorm'd inputs have unit-RMS entries: this std gives logits of std ~gate_std.
            block.ffn.router.gate.weight.normal_(0.0, gate_std / config.d_model ** 0.5)
    models = {"softmoe": soft}
    for k in topk:
        models[f"top{k}"] = _sharing(soft, replace(config, router="topk", k=float(k)))
    models["dense"] = _sharing(soft, replace(config, ffn="dense", d_ff=config.d_expert))
    return models


def _sharing(base: GPT, config: ModelConfig) -> GPT:
    """A GPT of `config` whose embedding, attention, norms and (for MoE) experts and gate are `base`'s modules."""
    model = GPT(config).eval()
    model.embed = base.embed
    model.norm = base.norm
    for mine, theirs in zip(model.blocks, base.blocks):
        mine.attn, mine.attn_norm, mine.ffn_norm = theirs.attn, theirs.attn_norm, theirs.ffn_norm
        if mine.is_moe:
            mine.ffn.experts = theirs.ffn.experts
            mine.ffn.router.gate = theirs.ffn.router.gate
        else:
            with torch.no_grad():  # dense: expert 0's weights as the FFN, so its FLOPs are one expert's
                mine.ffn.load_state_dict(_expert_as_ffn(theirs.ffn.experts, mine.ffn.state_dict()))
    return model


def _expert_as_ffn(experts, ffn_state: dict) -> dict:
    """Expert 0 of an ExpertBank as a SwiGLU state dict (shapes checked by load_state_dict)."""
    weights = {"w_gate": experts.w_gate[0], "w_up": experts.w_up[0], "w_down": experts.w_down[0]}
    out = {}
    for name, value in ffn_state.items():
        key = next(k for k in weights if k.split("_")[1] in name)
        w = weights[key]
        out[name] = w.t().contiguous() if w.t().shape == value.shape else w.contiguous()
    return out


def routers(model: GPT) -> list[SoftKRouter]:
    return [b.ffn.router for b in model.blocks if b.is_moe and isinstance(b.ffn.router, SoftKRouter)]


@torch.no_grad()
def realized_ae(model: GPT, ids_BS: torch.Tensor) -> float:
    """Mean active experts per token over the MoE layers, on these tokens (0 for dense)."""
    out = model(ids_BS)
    if not out.routing:
        return 0.0
    return statistics.fmean(float(s["active_experts_mean"]) for s in out.routing.values())


@torch.no_grad()
def decode_ae(model: GPT, prompt_BS: torch.Tensor, new_tokens: int) -> float:
    """Mean active experts per decoded token over the MoE layers, decoding greedily as `generate` does."""
    cache = model.new_cache(prompt_BS.shape[0], prompt_BS.shape[1] + new_tokens)
    out = model(prompt_BS, cache=cache, last_only=True)
    per_step = []
    for _ in range(new_tokens):
        step = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        out = model(step, cache=cache, last_only=True)
        if out.routing:  # dense: no MoE layers
            per_step.append(statistics.fmean(float(s["active_experts_mean"]) for s in out.routing.values()))
    return statistics.fmean(per_step) if per_step else 0.0


def _set_threshold(model: GPT, value: float) -> None:
    for router in routers(model):
        router.threshold.fill_(value)


@torch.no_grad()
def calibrate(model: GPT, ids_BS: torch.Tensor, target: float, decode_prompt: torch.Tensor | None = None,
              new_tokens: int = 0) -> float:
    """Set every SoftMoE router's `threshold` (one value) so the realized AE is ~target; returns it.

    A lower threshold keeps more experts (up to the cap m). Bisection in log space: first on the forward of
    ids_BS, then (with `decode_prompt`) within a factor 2 of that on the AE of the greedily decoded tokens,
    which are the tokens the decode timings see.
    """
    def bisect(lo: float, hi: float, steps: int, ae_of) -> float:
        for _ in range(steps):
            mid = (lo * hi) ** 0.5
            _set_threshold(model, mid)
            lo, hi = (mid, hi) if ae_of() > target else (lo, mid)
        return (lo * hi) ** 0.5

    value = bisect(1e-3, 1e3, 20, lambda: realized_ae(model, ids_BS))
    if decode_prompt is not None:
        value = bisect(value / 2, value * 2, 8, lambda: decode_ae(model, decode_prompt, new_tokens))
    _set_threshold(model, value)
    return value


def _hf(model: GPT):
    """The exported transformers model around the same GPT (no copy of the weights), on the GPT's device."""
    from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM

    small = replace(model.config, vocab_size=8, d_model=8, n_heads=1, d_ff=8, d_expert=8, num_experts=2, k=1.0,
                    router="topk" if model.config.router == "topk" else model.config.router, n_layers=1)
    if model.config.ffn == "dense":
        small = replace(small, ffn="dense")
    hf = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(small))
    hf.config = SoftMoEConfig.from_model_config(model.config)
    hf.model = model
    hf.generation_config.pad_token_id = 0
    return hf.to(next(model.parameters()).device).eval()


def _timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def decode_time(gen_fn, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds per decoded step: (t(N + 1 new tokens) - t(1)) / N (the prompt's prefill cancels)."""
    return (_timed(lambda: gen_fn(prompt, new_tokens + 1), prompt.device)
            - _timed(lambda: gen_fn(prompt, 1), prompt.device)) / new_tokens


def native_generate(model: GPT):
    return lambda prompt, n: generate(model, prompt, n, temperature=0.0)


def hf_generate(hf):
    # An explicit all-ones mask: without one transformers infers padding from pad_token_id in the prompt.
    return lambda prompt, n: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False)


def native_prefill(model: GPT):
    def run(prompt):
        with torch.no_grad():
            model(prompt, cache=model.new_cache(prompt.shape[0], prompt.shape[1]), last_only=True)
    return run


def hf_prefill(hf):
    def run(prompt):
        with torch.no_grad():
            hf(prompt, use_cache=True, logits_to_keep=1)
    return run


def measure(models: dict, prompts: dict, args) -> dict[str, dict[str, list[float]]]:
    """name -> measurement -> samples of seconds per token, candidates interleaved repeat by repeat."""
    paths = {"native": (native_prefill, native_generate)}
    if not args.no_hf:
        paths["hf"] = (hf_prefill, hf_generate)
    hf_models = {name: _hf(m) for name, m in models.items()} if not args.no_hf else {}
    jobs = {}
    for name, model in models.items():
        for path, (prefill, gen) in paths.items():
            target = model if path == "native" else hf_models[name]
            jobs[(name, f"{path}/prefill")] = (
                lambda p=prefill(target), x=prompts["prefill"]: _timed(lambda: p(x), x.device) / x.numel())
            for batch in args.decode_batches:
                jobs[(name, f"{path}/decode_b{batch}")] = (
                    lambda g=gen(target), x=prompts[f"decode_b{batch}"], n=args.new_tokens[batch]:
                    decode_time(g, x, n) / x.shape[0])
    samples: dict[str, dict[str, list[float]]] = {}
    for job in jobs.values():  # warmup: every kernel shape once
        job()
    for _ in range(args.repeats):
        for (name, what), job in jobs.items():
            samples.setdefault(name, {}).setdefault(what, []).append(job())
    return samples


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of t = a + b AE."""
    if len(points) < 2:
        return (points[0][1], 0.0) if points else (float("nan"), float("nan"))
    slope, intercept = statistics.linear_regression([p[0] for p in points], [p[1] for p in points])
    return intercept, slope


def summarise(samples: dict, ae_all: dict[str, dict[str, float]]) -> dict:
    """Per measurement: each variant's median time per token and tokens/s, the two fits, and the ratios."""
    out = {}
    measurements = next(iter(samples.values())).keys()
    for what in measurements:
        t = {name: statistics.median(s[what]) for name, s in samples.items()}
        ae = ae_all[what.split("/")[1]]
        top = [(ae[n], t[n]) for n in t if n.startswith("top")]
        soft = [(ae[n], t[n]) for n in t if n.startswith("softmoe")]
        a_top, b_top = fit(top)
        a_soft, b_soft = fit(soft)
        ratios = {n: t[n] / (a_top + b_top * ae[n]) for n in t if n.startswith("softmoe")}
        near = min((n for n in t if n.startswith("softmoe")), key=lambda n: abs(ae[n] - 1.4))
        top2 = t.get("top2", float("nan"))
        at_1_4 = a_soft + b_soft * 1.4  # SoftMoE's line at AE 1.4: robust where no variant realized 1.4 exactly
        out[what] = {
            "ms_per_token": {n: v * 1e3 for n, v in t.items()},
            "tokens_per_s": {n: 1.0 / v for n, v in t.items()},
            "fit_topk_ms": {"intercept": a_top * 1e3, "slope_per_expert": b_top * 1e3},
            "fit_softmoe_ms": {"intercept": a_soft * 1e3, "slope_per_expert": b_soft * 1e3},
            "softmoe_over_topk_at_equal_ae": ratios,
            "speedup_vs_top2": {"variant": near, "ae": ae[near], "value": top2 / t[near],
                                "fit_at_1_4": top2 / at_1_4,
                                # what top-k's own line gives at AE 1.4: any router whose per-token cost is
                                # top-k's reaches at most this (>= 1.25 needs slope >= intercept)
                                "ceiling_at_1_4": (a_top + 2.0 * b_top) / (a_top + 1.4 * b_top)},
            "ae": dict(ae),
        }
    return out


def print_summary(summary: dict) -> None:
    names = list(next(iter(summary.values()))["ms_per_token"])
    for what, s in summary.items():
        print(f"\n{what}: realized AE " + ", ".join(f"{n} {s['ae'][n]:.2f}" for n in names if n != "dense"))
        print("  ms per token (tokens/s)")
        print("  " + "  ".join(f"{n} {s['ms_per_token'][n]:.3f} ({s['tokens_per_s'][n]:.0f})" for n in names))
        ft, fs = s["fit_topk_ms"], s["fit_softmoe_ms"]
        print(f"  fit top-k  : {ft['intercept']:.3f} ms + {ft['slope_per_expert']:.3f} ms x AE")
        print(f"  fit SoftMoE: {fs['intercept']:.3f} ms + {fs['slope_per_expert']:.3f} ms x AE")
        print("  SoftMoE / top-k at equal AE: " + ", ".join(
            f"{n} {v:.2f}" for n, v in s["softmoe_over_topk_at_equal_ae"].items()))
        sp = s["speedup_vs_top2"]
        print(f"  tokens/s / top-2's: {sp['variant']} (AE {sp['ae']:.2f}) {sp['value']:.2f}; "
              f"SoftMoE's fit at AE 1.4 {sp['fit_at_1_4']:.2f}; top-k's fit at AE 1.4 (the ceiling) "
              f"{sp['ceiling_at_1_4']:.2f}")


def targets(summary: dict) -> dict:
    worst = max(v for s in summary.values() for v in s["softmoe_over_topk_at_equal_ae"].values())
    decode = {w: s["speedup_vs_top2"]["fit_at_1_4"] for w, s in summary.items() if "decode" in w}
    ceiling = {w: s["speedup_vs_top2"]["ceiling_at_1_4"] for w, s in summary.items() if "decode" in w}
    return {"within_10pct": worst <= TARGET_RATIO, "worst_ratio": worst,
            "decode_speedup_at_1_4": decode, "speedup_met": all(v >= TARGET_SPEEDUP for v in decode.values()),
            "decode_ceiling_at_1_4": ceiling}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: seconds, for the smoke test")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="N decoded tokens per timed generate (default 32 at batch 1, 8 at larger batches)")
    parser.add_argument("--prefill", type=int, nargs=2, default=None, metavar=("B", "S"))
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=None, help="decode prompts' length")
    parser.add_argument("--topk", type=int, nargs="+", default=list(TOPK), help="top-k variants (k values)")
    parser.add_argument("--ae", type=float, nargs="+", default=list(SOFT_AE), help="SoftMoE AE targets")
    parser.add_argument("--gate-std", type=float, default=1.0)
    parser.add_argument("--d-expert", type=int, default=2048,
                        help="expert width (a wider expert makes the experts a larger share of a decode step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<index>")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights, activations and KV cache (bfloat16: the GPU's grouped expert matmuls)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers path")
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/<name>.json")
    parser.add_argument("--name", default="bench_infer")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 5)
    fixed = args.new_tokens
    args.new_tokens = {b: fixed or (2 if quick else 32 if b == 1 else 8) for b in args.decode_batches}
    args.prefill = args.prefill or ([2, 8] if quick else [4, 128])
    args.prompt_len = args.prompt_len or (4 if quick else 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)

    config = base_config(quick, args.d_expert)
    models = build_models(config, args.gate_std, args.topk)
    gen = torch.Generator().manual_seed(1)
    ids = lambda b, s: torch.randint(0, config.vocab_size, (b, s), generator=gen).to(args.device)  # noqa: E731
    prompts = {"prefill": ids(*args.prefill), **{f"decode_b{b}": ids(b, args.prompt_len) for b in args.decode_batches}}
    calibration = ids(8, 64) if not quick else ids(2, 8)
    largest = f"decode_b{max(args.decode_batches)}"
    dtype = getattr(torch, args.dtype)
    for model in models.values():
        model.to(args.device, dtype)
    soft = models.pop("softmoe")
    for target in args.ae:  # one model per AE target, sharing the weights; its threshold buffers set by bisection
        variant = _sharing(soft, soft.config).to(args.device, dtype)  # its own buffers (rotary tables) too
        calibrate(variant, calibration, target, prompts[largest], args.new_tokens[max(args.decode_batches)])
        models[f"softmoe@{target:g}"] = variant
    # AE realized where each measurement routes: the prefill prompts, and the tokens each decode produces
    # (greedy: the timed runs decode the same ones).
    ae = {"prefill": {n: realized_ae(m, prompts["prefill"]) for n, m in models.items()}}
    for b in args.decode_batches:
        ae[f"decode_b{b}"] = {n: decode_ae(m, prompts[f"decode_b{b}"], args.new_tokens[b]) for n, m in models.items()}
    for per in ae.values():
        per["dense"] = 1.0  # one expert's FLOPs, no routing

    samples = measure(models, prompts, args)
    summary = summarise(samples, ae)
    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"{torch.get_num_threads()} CPU thread(s)")
    print(f"{config.n_layers} blocks, d_model {config.d_model}, {config.num_experts} experts of width "
          f"{config.d_expert}, vocab {config.vocab_size}; {where}, {args.dtype}, "
          f"{args.repeats} interleaved repeats; prefill {args.prefill[0]} x {args.prefill[1]}, decode "
          + ", ".join(f"{n} tokens at batch {b}" for b, n in args.new_tokens.items())
          + f" after a {args.prompt_len}-token prompt")
    print_summary(summary)
    met = targets(summary)
    print(f"\ntarget SoftMoE / top-k <= {TARGET_RATIO} at equal AE: worst {met['worst_ratio']:.2f} -> "
          f"{'met' if met['within_10pct'] else 'MISSED'}")
    print(f"target decode tokens/s at AE 1.4 (SoftMoE's fit) >= {TARGET_SPEEDUP} x top-2: " + ", ".join(
        f"{w} {v:.2f}" for w, v in met["decode_speedup_at_1_4"].items()) + f" -> "
          f"{'met' if met['speedup_met'] else 'MISSED'}")
    print("  reachable at all (top-k's own line at AE 1.4, any router with top-k's cost per token): " + ", ".join(
        f"{w} {v:.2f}" for w, v in met["decode_ceiling_at_1_4"].items()))
    if args.json:
        path = write_json(args.name, [{"what": w, **s} for w, s in summary.items()],
                          {"ae": ae, "targets": met, "config": dataclasses.asdict(config), "device": str(args.device),
                           "dtype": args.dtype,
                           "command": "benchmarks/bench_infer.py " + " ".join(sys.argv[1:] if argv is None else argv)})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
