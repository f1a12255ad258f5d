"""softmoe.common.checks: one exception type per kind of mistake (TypeError: wrong type, ValueError: bad
value), every message naming the argument and its value.

Run: .venv/bin/python -m pytest -q tests/unit/common/test_checks.py
"""

from __future__ import annotations

import math

import pytest

from softmoe.common.checks import check_bool, check_choice, check_distinct_choices, check_float, check_int


@pytest.mark.parametrize("value, kwargs, error, match", [
    (2.0, dict(low=1), TypeError, r"n=2.0 must be an int >= 1"),
    (True, dict(low=0), TypeError, r"n=True must be an int >= 0"),
    ("3", dict(), TypeError, r"n='3' must be an int"),
    (0, dict(low=1), ValueError, r"n=0 must be an int >= 1"),
    (9, dict(low=1, high=8), ValueError, r"n=9 must be an int in \[1, 8\]"),
    (None, dict(low=1), TypeError, r"n=None must be an int >= 1"),
    (0, dict(low=1, allow_none=True), ValueError, r"n=0 must be None or an int >= 1"),
])
def test_check_int(value, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_int("n", value, **kwargs)


def test_check_int_accepts():
    check_int("n", 3, 1, 8)
    check_int("n", None, 1, allow_none=True)
    check_int("n", -5)


@pytest.mark.parametrize("value, kwargs, error, match", [
    ("0.5", dict(), TypeError, r"x must be a float, got str '0.5'"),
    (False, dict(), TypeError, r"x must be a float, got bool"),
    (math.nan, dict(), ValueError, r"x=nan must be a finite number"),
    (math.inf, dict(), ValueError, r"x=inf must be a finite number$"),
    (0.0, dict(low=0.0, open_low=True), ValueError, r"x=0.0 must be a finite number > 0.0"),
    (-1.0, dict(low=0.0), ValueError, r"x=-1.0 must be a finite number >= 0.0"),
    (1.5, dict(low=0.0, high=1.0), ValueError, r"x=1.5 must be a finite number in \[0.0, 1.0\]"),
])
def test_check_float(value, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_float("x", value, **kwargs)


def test_check_float_accepts_ints_and_bounds():
    check_float("x", 1, 0.0, 1.0)
    check_float("x", 0.0, 0.0, 1.0)


def test_check_bool_and_choice():
    check_bool("flag", False)
    with pytest.raises(TypeError, match=r"flag must be a bool, got int \(1\)"):
        check_bool("flag", 1)
    check_choice("mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match=r"mode='c' must be one of \('a', 'b'\)"):
        check_choice("mode", "c", ("a", "b"))
    check_choice("mode", "b", ["b", "a"])  # a list is shown as given
    with pytest.raises(ValueError, match=r"mode=3 must be one of \['b', 'a'\]"):
        check_choice("mode", 3, ["b", "a"])


def test_check_distinct_choices():
    check_distinct_choices("splits", ("val", "test"), ("train", "val", "test"))
    check_distinct_choices("splits", [], ("train", "val"))  # empty passes: the caller says if it must not
    with pytest.raises(TypeError, match=r"splits='val' must be a list of distinct values from \['train', 'val'\]"):
        check_distinct_choices("splits", "val", ("train", "val"))
    with pytest.raises(ValueError, match=r"splits=\['val', 'val'\] must be distinct values from \['train', 'val'\]$"):
        check_distinct_choices("splits", ["val", "val"], ("train", "val"))
    with pytest.raises(ValueError, match=r"splits=\['dev', \['x'\]\] must be .*; unknown: \['dev', \['x'\]\]"):
        check_distinct_choices("splits", ["dev", ["x"]], {"train": 0, "val": 1})  # unhashable: reported, dict keys
