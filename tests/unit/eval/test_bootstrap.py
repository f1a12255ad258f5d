"""Bootstrap confidence intervals of the zero-shot metrics: seeded, bracketing the mean, shrinking with n.

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_bootstrap.py
"""

from __future__ import annotations

import numpy as np
import pytest

from softmoe.eval.downstream import bootstrap_ci


def coin(n: int, p: float = 0.6, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_constant_values_give_a_point_interval():
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0)
    assert bootstrap_ci([0.25]) == (0.25, 0.25)


def test_seeded_and_reproducible():
    values = coin(200)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_brackets_the_mean_within_bounds_and_shrinks_with_n():
    widths = []
    for n in (50, 500, 5000):
        values = coin(n)
        lo, hi = bootstrap_ci(values)
        assert 0.0 <= lo <= values.mean() <= hi <= 1.0
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # Close to the normal approximation 2 x 1.96 x sqrt(p (1 - p) / n) for a large sample.
    values = coin(5000)
    p = values.mean()
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 5000), rel=0.15)


def test_wider_confidence_gives_a_wider_interval():
    values = coin(300)
    lo90, hi90 = bootstrap_ci(values, confidence=0.90)
    lo99, hi99 = bootstrap_ci(values, confidence=0.99)
    assert lo99 <= lo90 and hi90 <= hi99


@pytest.mark.parametrize("kwargs, match", [
    (dict(values=[]), "values"),
    (dict(values=[[1.0, 2.0]]), "values"),
    (dict(values=[1.0], resamples=0), "resamples=0"),
    (dict(values=[1.0], confidence=1.5), "confidence=1.5"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**kwargs)
