"""How closely a retrofitted (softmoe.convert.from_hf) tiny Mixtral / Qwen2-MoE / OLMoE reproduces the original's
logits before any training, as a function of alpha. Tiny random models (tests/unit/convert/test_from_hf.py's
configs: 2 layers, hidden 32, 8 experts, top-2, router logits of std ~1), 8 x 64 tokens, fp32, CPU.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_retrofit_equivalence.py
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's tests/
from softmoe.convert import from_hf  # noqa: E402
from tests.unit.convert.test_from_hf import FAMILIES, K, ids, margins, tiny  # noqa: E402

ALPHAS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def main() -> None:
    rows = []
    for family in FAMILIES:
        model = tiny(family)
        x = ids(batch=8, length=64, seed=5)
        with torch.no_grad():
            ref = model(x, output_router_logits=True)
            margin_BS = margins(ref.router_logits, x.shape[0])
            for alpha in ALPHAS:
                converted = from_hf(copy.deepcopy(model), alpha=alpha)
                with converted.softmoe_retrofit.collect() as routing:
                    diff = (converted(x).logits - ref.logits).abs()
                active = sum(float(s["active_experts_mean"]) for s in routing.stats.values()) / len(routing.stats)
                rows.append({"family": family, "alpha": alpha, "max_abs_dlogit": float(diff.max()),
                             "mean_abs_dlogit": float(diff.mean()), "logit_scale": float(ref.logits.abs().mean()),
                             "tokens_margin_lt_40alpha": float((margin_BS < 40 * alpha).float().mean()),
                             "mean_active_experts": active, "min_margin": float(margin_BS.min())})
    print("| model | alpha | max abs dlogit | mean abs dlogit | tokens with margin < 40 alpha | mean active experts |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['alpha']:g} | {r['max_abs_dlogit']:.3g} | {r['mean_abs_dlogit']:.3g} | "
              f"{100 * r['tokens_margin_lt_40alpha']:.1f}% | {r['mean_active_experts']:.3f} |")
    print("mean |logit|:", {r["family"]: round(r["logit_scale"], 3) for r in rows},
          "min margin:", {r["family"]: r["min_margin"] for r in rows}, "k =", K)
    out = Path(__file__).parent / "results" / "retrofit_equivalence.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
