"""Training throughput of whole presets: tokens/s, model FLOP utilisation, peak RSS, per-op profile.

For each preset (the demo dense / topk / softmoe models and the small study's topk by default) a fresh
subprocess builds the run exactly as `softmoe train` would (`Trainer` from the YAML), runs warmup
steps, then timed optimizer steps (`Trainer.train_step`: forward, backward, clipping, AdamW), and
between every two steps times this machine's matmul rate in the same process and thread setting:
a [4096 x 256] @ [256 x 256] matmul in bf16 and in fp32. Each preset runs in its own subprocess so its
peak RSS (`ru_maxrss`, after the timed steps and one validation pass) is its own. Presets run one
after the other, `--rounds` times round-robin; every number reported is the median over rounds of
the per-round median, and utilisation is computed per step against the matmul rate measured right
next to it, so background load on the shared machine largely cancels in the ratios.

Model FLOPs per token (training, matmuls only, 2 FLOPs per multiply-accumulate; forward x 3 for
forward + backward, as in the usual MFU convention):

    F = 3 x [ 2 x (P_attn + P_head)                       attention projections (qkv, proj), tied head D x V
              + 2 x P_ffn_active                          dense FFN, or a_l x one expert's params + router gate
              + 4 x L x D x (S + 1) / 2 ]                 causal attention: QK^T and AV over (S + 1) / 2 keys
                                                          on average (what a causal kernel computes)

with a_l the realized mean active experts of MoE block l in the timed steps (top-k: exactly k; SoftMoE:
what its routing did). Norms, activations, softmax, routing and the optimizer are not counted: they
are the overhead utilisation measures. Utilisation = F x tokens/s / (same-run bf16 matmul rate).

Data: the presets' own corpus when it is prepared (`softmoe data fetch --corpus prose`), otherwise
the tiny fixture corpus with the preset's model unchanged (marked "data": "tiny" in the output;
throughput does not depend on the text, only the vocabulary of the sampled ids differs).

Run:
    .venv/bin/python benchmarks/bench_train.py                       # table
    .venv/bin/python benchmarks/bench_train.py --json                # also benchmarks/results/bench_train.json
    .venv/bin/python benchmarks/bench_train.py --presets demo/topk --rounds 1 --profile-steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.timing import machine_info, write_json  # noqa: E402

DEFAULT_PRESETS = ("demo/dense", "demo/topk", "demo/softmoe", "small/topk")
MATMUL_SHAPE = (4096, 256, 256)  # [M x K] @ [K x N]: a demo-sized activation through a d_model x d_model weight
TARGETS = {"utilisation_topk_min": 0.25, "softmoe_over_topk_tok_s_min": 0.9, "topk_over_dense_tok_s_min": 0.85,
           "moe_over_dense_rss_max": 1.5}


# ---------------------------------------------------------------- measured in the worker subprocess

def matmul_rate(dtype: torch.dtype, calls: int = 5) -> float:
    """FLOP/s of the best of `calls` [M x K] @ [K x N] matmuls in `dtype` (operands preallocated)."""
    m, k, n = MATMUL_SHAPE
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(calls):
        tic = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - tic) / 4)
    return 2.0 * m * k * n / best


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_flops_per_token(model, seq_len: int, active_L: list[float]) -> dict[str, float]:
    """Training FLOPs per token by the formula in this module's docstring; `active_L` per MoE block."""
    d, layers = model.config.d_model, model.config.n_layers
    attn = sum(_numel(block.attn) for block in model.blocks)
    head = model.embed.weight.numel()
    ffn, active = 0.0, iter(active_L)
    for block in model.blocks:
        if not block.is_moe:
            ffn += _numel(block.ffn)
            continue
        bank = block.ffn.experts
        shared = _numel(block.ffn.shared_experts) if block.ffn.shared_experts is not None else 0
        ffn += next(active) * _numel(bank) / bank.w_gate.shape[0] + shared + _numel(block.ffn.router.gate)
    parts = {"attn_proj": 2.0 * attn, "head": 2.0 * head, "ffn": 2.0 * ffn,
             "attn_scores": 4.0 * layers * d * (seq_len + 1) / 2}
    return {"forward": sum(parts.values()), "train": 3.0 * sum(parts.values()), **parts}


def profile_steps(trainer, first_step: int, steps: int, top: int = 14) -> list[dict]:
    """Self CPU time by op over `steps` training steps: the `top` ops and their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            trainer.train_step(first_step + i)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in events[:top]]


def split_preset(preset: str) -> tuple[str, list[str]]:
    """'demo/topk@model.k=1@train.lr=1e-3' -> ('demo/topk', ['model.k=1', 'train.lr=1e-3']): a preset and overrides."""
    name, *overrides = preset.split("@")
    bad = [o for o in overrides if "=" not in o]
    if not name or bad:
        raise SystemExit(f"--presets: {preset!r} is not <size>/<name>[@key=value...]")
    return name, overrides


def build(preset: str, threads: int):
    """The preset's `Trainer`, built exactly as `softmoe train` builds it; (trainer, config, data name)."""
    from softmoe.data import dataset_dir_for
    from softmoe.data.fetch import FetchError
    from softmoe.train.config import load_run_config
    from softmoe.train.loop import Trainer

    out_dir = tempfile.mkdtemp(prefix="bench_train_")
    name, variant = split_preset(preset)
    overrides = variant + [f"train.out_dir={out_dir}", "train.progress=false", "train.tensorboard=false"]
    if threads:
        overrides.append(f"train.threads={threads}")
    config = load_run_config(ROOT / "configs" / f"{name}.yaml", overrides)
    data = config.data.corpus
    try:
        dataset_dir_for(config.data)
    except (FileNotFoundError, FetchError):
        data = "tiny"
        config = load_run_config(ROOT / "configs" / f"{name}.yaml", overrides + ["data.corpus=tiny"])
    return Trainer(config, report=lambda message: None), config, data


def timed_step(trainer, step: int) -> tuple[float, float, float, list[float]]:
    """One optimizer step with the matmul probes right before it: (seconds, bf16 rate, fp32 rate, AE per layer)."""
    bf16, fp32 = matmul_rate(torch.bfloat16), matmul_rate(torch.float32)
    tic = time.perf_counter()
    stats = trainer.train_step(step)
    return time.perf_counter() - tic, bf16, fp32, [layer["active_experts_mean"] for layer in stats.layers]


def measured_row(preset: str, trainer, config, data: str, build_s: float, steps: list[tuple]) -> dict:
    """The JSON row of one preset from its timed steps (`timed_step` tuples)."""
    from softmoe.train.metrics import mean_active_experts

    tokens = trainer.data.tokens_per_batch * config.train.grad_accum
    step_s, bf16, fp32, active = (list(x) for x in zip(*steps))
    active_L = [statistics.fmean(a) for a in zip(*active)] if active and active[0] else []
    flops = model_flops_per_token(trainer.model, config.data.seq_len, active_L)
    util = [flops["train"] * tokens / s / rate for s, rate in zip(step_s, bf16)]
    return {
        "preset": preset, "data": data, "precision": config.train.precision, "threads": torch.get_num_threads(),
        "tokens_per_step": tokens, "params": trainer.model.num_params(), "build_s": build_s,
        "step_s": statistics.median(step_s), "tok_s": tokens / statistics.median(step_s),
        "tok_s_per_step": [tokens / s for s in step_s], "utilisation_per_step": util,
        "bf16_flops": statistics.median(bf16), "fp32_flops": statistics.median(fp32),
        "utilisation": statistics.median(util), "utilisation_fp32": flops["train"] * tokens /
        statistics.median(step_s) / statistics.median(fp32),
        "model_flops_per_token": flops, "active_experts_mean": mean_active_experts(
            [{"active_experts_mean": a} for a in active_L]),
    }


def worker(preset: str, steps: int, warmup: int, n_profile: int, threads: int) -> dict:
    """Build the preset's run, time `steps` optimizer steps with matmul rates in between; one JSON dict."""
    from softmoe.train.loop import evaluate

    build_tic = time.perf_counter()
    trainer, config, data = build(preset, threads)
    build_s = time.perf_counter() - build_tic
    for step in range(warmup):
        trainer.train_step(step)
    row = measured_row(preset, trainer, config, data, build_s,
                       [timed_step(trainer, step) for step in range(warmup, warmup + steps)])
    evaluate(trainer.model, trainer.data.val_batches(2), config.train.precision)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["profile"] = profile_steps(trainer, warmup + steps, n_profile) if n_profile else []
    return row


def interleaved_worker(presets: list[str], steps: int, warmup: int, threads: int) -> list[dict]:
    """Every preset built in one process, their timed steps alternating (step i of each preset back to back).

    On a shared, noisy machine the load changes on a scale of seconds to minutes; steps a second apart see
    nearly the same load, so per-step ratios between presets are far steadier than ratios of separate
    subprocess rounds. Peak RSS is the process's (all presets together), so it is not reported per preset.
    """
    built = {}
    for preset in presets:
        tic = time.perf_counter()
        built[preset] = (*build(preset, threads), time.perf_counter() - tic)
    for step in range(warmup):
        for trainer, *_ in built.values():
            trainer.train_step(step)
    timed = {preset: [] for preset in presets}
    for step in range(warmup, warmup + steps):
        for preset, (trainer, *_) in built.items():
            timed[preset].append(timed_step(trainer, step))
    rows = []
    for preset, (trainer, config, data, build_s) in built.items():
        row = measured_row(preset, trainer, config, data, build_s, timed[preset])
        row.update({"peak_rss_mb": None, "profile": [], "rounds": 1, "interleaved": True,
                    "tok_s_per_round": row["tok_s_per_step"], "utilisation_per_round": row["utilisation_per_step"]})
        rows.append(row)
    return rows


def fit_run(preset: str, steps: int, threads: int) -> dict:
    """Peak RSS and wall time of a whole `softmoe train` run of `preset` cut to `steps` steps (its
    periodic evaluation and checkpoints included), in a child process of its own (`os.wait4`)."""
    out_dir = tempfile.mkdtemp(prefix="bench_train_fit_")
    name, variant = split_preset(preset)
    cmd = [sys.executable, "-m", "softmoe.cli", "train", "--config", str(ROOT / "configs" / f"{name}.yaml"), *variant,
           f"train.steps={steps}", f"train.out_dir={out_dir}", "train.progress=false", "train.tensorboard=false",
           f"train.eval_every={max(1, steps // 3)}", f"train.ckpt_every={max(1, steps // 3)}"]
    if threads:
        cmd.append(f"train.threads={threads}")
    tic = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - tic
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"softmoe train {preset} failed:\n{child.stderr.read()[-4000:]}")
    return {"preset": preset, "steps": steps, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


# ---------------------------------------------------------------- the driver

def run_worker(preset: str, args, root: Path = ROOT, profile: bool = True) -> dict:
    """One worker subprocess running the code of checkout `root` (its benchmarks/bench_train.py)."""
    cmd = [sys.executable, str(root / "benchmarks" / "bench_train.py"), "--worker", preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--profile-steps", str(args.profile_steps if profile else 0), "--threads", str(args.threads)]
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    env["SOFTMOE_DATA_DIR"] = env.get("SOFTMOE_DATA_DIR", str(ROOT / "data"))  # one prepared corpus for both
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"worker {preset} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(preset: str, rounds: list[dict]) -> dict:
    """Median over rounds of every scalar; the profile of the last round."""
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    keys = ("step_s", "tok_s", "bf16_flops", "fp32_flops", "utilisation", "utilisation_fp32", "peak_rss_mb",
            "build_s")
    row = {key: med(key) for key in keys}
    row.update({"preset": preset, "rounds": len(rounds), "data": rounds[0]["data"],
                "precision": rounds[0]["precision"], "threads": rounds[0]["threads"],
                "params": rounds[0]["params"], "tokens_per_step": rounds[0]["tokens_per_step"],
                "model_flops_per_token": rounds[-1]["model_flops_per_token"],
                "active_experts_mean": rounds[-1]["active_experts_mean"],
                "tok_s_per_round": [r["tok_s"] for r in rounds],
                "utilisation_per_round": [r["utilisation"] for r in rounds],
                "profile": rounds[-1]["profile"]})
    return row


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """Same-run ratios of the demo presets (tokens/s per round, then the median) and peak RSS."""
    out = {}

    def per_round(a: str, b: str, key: str) -> float | None:
        if a not in rows or b not in rows:
            return None
        return statistics.median(x / y for x, y in zip(rows[a][f"{key}_per_round"], rows[b][f"{key}_per_round"]))

    # tok/s ratios, and the utilisation ratio: tokens/s per model FLOP, i.e. the tok/s ratio the two
    # would have at equal realized active experts (SoftMoE's differ from top-k's k).
    # Per variant suffix ("" or e.g. "@train.compile=true"), the pairs that share it. SoftMoE's rule realizes
    # ~1 expert at the demo shape, so top-1 ("demo/topk@model.k=1<suffix>") is the equal-AE baseline when run.
    suffixes = sorted({key.split("@", 1)[1] if "@" in key else "" for key in rows})
    for suffix in suffixes:
        tail, label = (f"@{suffix}", f" ({suffix})") if suffix else ("", "")
        top1 = "demo/topk@model.k=1" + tail if suffix != "model.k=1" else None
        pairs = {"softmoe_over_topk_tok_s": ("demo/softmoe", "demo/topk", "tok_s"),
                 "softmoe_over_topk_flop_rate": ("demo/softmoe", "demo/topk", "utilisation"),
                 "topk_over_dense_tok_s": ("demo/topk", "demo/dense", "tok_s")}
        for name, (a, b, key) in pairs.items():
            value = per_round(a + tail, b + tail, key)
            if value is not None:
                out[name + label] = value
        if top1:
            value = per_round("demo/softmoe" + tail, top1, "tok_s")
            if value is not None:
                out["softmoe_over_top1_tok_s" + label] = value
    for key in rows:
        if key.startswith("before:") and key[len("before:"):] in rows:
            out[f"{key[len('before:'):]}: after/before tok_s"] = per_round(key[len("before:"):], key, "tok_s")
    if "demo/dense" in rows and rows["demo/dense"]["peak_rss_mb"] is not None:
        for moe in ("demo/topk", "demo/softmoe"):
            if moe in rows:
                out[f"{moe.split('/')[1]}_over_dense_rss"] = rows[moe]["peak_rss_mb"] / rows["demo/dense"]["peak_rss_mb"]
    return out


def print_table(rows: dict[str, dict], rat: dict[str, float]) -> None:
    print("| preset | data | tok/s | MFLOP/token | active experts | bf16 GFLOP/s | fp32 GFLOP/s | util (bf16) "
          "| util (fp32) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        act = "-" if r["active_experts_mean"] is None else f"{r['active_experts_mean']:.2f}"
        print(f"| {r['preset']} | {r['data']} | {r['tok_s']:.0f} | {r['model_flops_per_token']['train'] / 1e6:.1f} "
              f"| {act} | {r['bf16_flops'] / 1e9:.0f} | {r['fp32_flops'] / 1e9:.0f} | {r['utilisation']:.1%} "
              f"| {r['utilisation_fp32']:.1%} | {'-' if r['peak_rss_mb'] is None else round(r['peak_rss_mb'])} |")
    print()
    for name, value in rat.items():
        print(f"{name}: {value:.3f}")
    for r in rows.values():
        unit = "step" if r.get("interleaved") else "round"
        print(f"\n{r['preset']}: tok/s per {unit} {[round(x) for x in r['tok_s_per_round']]}"
              + ("; top ops (self CPU):" if r["profile"] else ""))
        for p in r["profile"]:
            print(f"  {p['share']:6.1%} {p['ms_per_step']:8.1f} ms/step {p['calls_per_step']:7.0f} calls  {p['op']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated configs/<size>/<name>, each with optional "
                        "@key=value overrides (demo/topk@model.k=1)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin repeats of every preset")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per preset and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps under torch.profiler (0: none)")
    parser.add_argument("--fit-steps", type=int, default=0,
                        help="also time whole `softmoe train` runs of this many steps per preset (peak RSS of a run)")
    parser.add_argument("--baseline", help="a checkout of the code before (holding this file): its runs interleave "
                                           "with this checkout's, rows 'before:<preset>'")
    parser.add_argument("--threads", type=int, default=0, help="train.threads override (0: the preset's own)")
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/<name>.json")
    parser.add_argument("--name", default="bench_train", help="results file name (with --json)")
    parser.add_argument("--interleave", action="store_true",
                        help="one process, the presets' timed steps alternating (steadier ratios on a busy box; "
                             "no per-preset peak RSS, no profile, no --baseline)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.profile_steps, args.threads)))
        return 0
    presets = [p for p in args.presets.split(",") if p]
    if args.interleave:
        if args.baseline:
            raise SystemExit("--interleave: not with --baseline (two checkouts cannot share one process)")
        if args.threads:
            torch.set_num_threads(args.threads)
        rows = {row["preset"]: row for row in interleaved_worker(presets, args.steps, args.warmup, args.threads)}
        rat = ratios(rows)
        print_table(rows, rat)
        if args.json:
            print(write_json(args.name, list(rows.values()), {**_run_info(argv), "ratios": rat, "interleaved": True}))
        return 0
    # With --baseline, every preset also runs from that checkout, right before this one's run.
    roots = {"": ROOT} if args.baseline is None else {"before:": Path(args.baseline).resolve(), "": ROOT}
    results: dict[str, list[dict]] = {label + p: [] for p in presets for label in roots}
    for r in range(args.rounds):
        for preset in presets:
            for label, root in roots.items():  # the last round profiles
                results[label + preset].append(run_worker(preset, args, root, profile=r == args.rounds - 1))
    rows = {key: summarise(key, runs) for key, runs in results.items()} if args.rounds else {}
    rat = ratios(rows)
    print_table(rows, rat)
    fits = [fit_run(p, args.fit_steps, args.threads) for p in presets] if args.fit_steps else []
    for fit in fits:
        print(f"softmoe train {fit['preset']} ({fit['steps']} steps, evals, checkpoints): "
              f"{fit['wall_s']:.0f} s, peak RSS {fit['peak_rss_mb']:.0f} MB")
    if args.json:
        print(write_json(args.name, list(rows.values()), {**_run_info(argv), "ratios": rat, "fit_runs": fits}))
    return 0


def _run_info(argv) -> dict:
    return {"lscpu_model": _cpu_model(), "amx": _has_flag("amx_tile"), "avx512_bf16": _has_flag("avx512_bf16"),
            "matmul_shape": MATMUL_SHAPE, "targets": TARGETS,
            "command": " ".join([Path(sys.executable).name, "benchmarks/bench_train.py", *(argv or sys.argv[1:])])}


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _cpu_flags().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return machine_info()["cpu"]


def _has_flag(flag: str) -> bool:
    return f" {flag}" in _cpu_flags()


if __name__ == "__main__":
    raise SystemExit(main())
