"""The compare results flag non-causal variants (†) and put fine-grained / shared-expert variants on the
frontier by their realised FFN FLOPs in coarse experts, not by their routed-expert count.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_compare_flags.py
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from softmoe.studies.results import _aggregate, _x, results_markdown

METRICS = ("loss", "perplexity", "bits_per_byte", "active_experts_mean", "expert_flops_per_token", "tokens_per_sec",
           "expert_equivalents")


def record(variant: str, causal: bool = True, granularity: int = 1, shared: int = 0, active: float = 2.0,
           equivalents: float = 2.0) -> dict:
    values = dict.fromkeys(METRICS, 1.0)
    values.update(active_experts_mean=active, expert_equivalents=equivalents)
    return {"variant": variant, "router": "topk", "causal": causal, "granularity": granularity,
            "num_shared_experts": shared, **values}


def test_non_causal_variants_are_marked_in_results_md():
    variants = (SimpleNamespace(name="topk", label="top-k"), SimpleNamespace(name="ec", label="expert choice"))
    rows = _aggregate([record("topk"), record("ec", causal=False)], variants)
    config = SimpleNamespace(train=SimpleNamespace(steps=1, grad_accum=1),
                             data=SimpleNamespace(batch_size=1, seq_len=8, corpus="tiny"))
    study = SimpleNamespace(name="s", path=Path("/x/s.yaml"), base=Path("/x/b.yaml"), seeds=(0,), reference=None,
                            evaluation=SimpleNamespace(max_batches=None, splits=("val",)))
    text = results_markdown(study, [SimpleNamespace(config=config, tokens=8)], rows, [])
    assert "| expert choice † |" in text and "| top-k |" in text
    assert "† non-causal router" in text
    assert "† non-causal" not in results_markdown(study, [SimpleNamespace(config=config, tokens=8)], rows[:1], [])


def test_frontier_x_uses_flops_for_fine_grained_and_shared_variants():
    assert _x(record("a", active=2.0, equivalents=2.0)) == 2.0
    assert _x(record("b", granularity=4, active=8.0, equivalents=2.0)) == 2.0  # 8 fine experts = 2 coarse
    assert _x(record("c", shared=1, active=2.0, equivalents=3.0)) == 3.0  # shared experts count
