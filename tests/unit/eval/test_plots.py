"""Plots a researcher reads at a glance: one hue per router family, seed means, honest k_l ranges and titles
that state the compute used.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_plots.py
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from softmoe.studies.results import seed_mean, variant_colors  # noqa: E402
from softmoe.studies.report import compute_title, k_range  # noqa: E402


def _hue(rgb) -> float:
    import colorsys

    return colorsys.rgb_to_hsv(*rgb)[0]


def test_router_families_get_distinct_hues_and_variants_shades_of_theirs():
    variants = tuple(SimpleNamespace(name=n) for n in ("soft_a", "topk_1", "soft_b", "soft_c", "remoe", "dense"))
    routers = {"soft_a": "softmoe", "soft_b": "softmoe", "soft_c": "softmoe", "topk_1": "topk", "remoe": "remoe",
               "dense": "dense"}
    colors = variant_colors(variants, [{"variant": v, "router": r} for v, r in routers.items()])
    assert len(set(colors.values())) == len(variants)
    soft = [colors[n] for n in ("soft_a", "soft_b", "soft_c")]
    assert max(_hue(c) for c in soft) - min(_hue(c) for c in soft) < 0.02  # one family, one hue
    hues = [_hue(colors[n]) for n in ("soft_a", "topk_1", "remoe")]
    assert min(abs(a - b) for i, a in enumerate(hues) for b in hues[i + 1:]) > 0.05  # families differ in hue


def test_seed_mean_and_band(tmp_path):
    for seed, losses in enumerate(([3.0, 2.0, 1.0], [3.2, 2.2, 1.4])):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        lines = [{"step": 10 * (i + 1), "split": "train", "loss": v} for i, v in enumerate(losses)]
        if seed == 1:
            lines.append({"step": 40, "split": "train", "loss": 0.5})  # a step the other seed did not log
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    steps, mean, std = seed_mean([tmp_path / "s0", tmp_path / "s1"], "train")
    assert steps.tolist() == [10, 20, 30]
    np.testing.assert_allclose(mean, [3.1, 2.1, 1.2])
    np.testing.assert_allclose(std, np.std([[3.0, 2.0, 1.0], [3.2, 2.2, 1.4]], axis=0, ddof=1))


def test_k_range_is_never_a_magnifying_glass():
    low, high = k_range([1.97, 2.03], budget=2.0)
    assert low <= 1.5 and high >= 2.5
    low, high = k_range([0.4, 3.6], budget=2.0)
    assert low <= 0.4 and high >= 3.6


def test_title_states_the_compute_used():
    runs = [SimpleNamespace(final=SimpleNamespace(active_experts_mean=2.86)),
            SimpleNamespace(final=SimpleNamespace(active_experts_mean=2.0))]
    assert compute_title(runs) == "2.86 vs 2.00 active experts per token (1.43x the expert FLOPs)"


def test_panel_grid_wraps_eight_panels_into_rows_of_four_and_hides_the_rest():
    pytest.importorskip("matplotlib")
    from softmoe.eval.plots import panel_grid, pyplot, wrapped

    fig, axes = panel_grid(6, 3.0, 2.0)
    try:
        assert len(axes) == 6 and len(fig.axes) == 8  # a 2 x 4 grid, its last two panels hidden
        assert [ax.get_visible() for ax in fig.axes] == [True] * 6 + [False] * 2
        assert tuple(fig.get_size_inches()) == (12.0, 4.0)
    finally:
        pyplot().close(fig)
    assert max(len(line) for line in wrapped("SoftMoE K=1.5, kept p renormalised to 1 (output-scale control)")
               .splitlines()) <= 42
