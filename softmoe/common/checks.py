"""Argument checks shared by config dataclasses and public functions: one exception type per kind of mistake.

    TypeError   the value has the wrong type (a str where a float belongs, a float where an int belongs;
                a bool is neither an int nor a float here)
    ValueError  the type is right but the value is not allowed (out of range, not finite, not a choice)

Every message names the argument and the value, so a config error reads `alpha=0.0 must be ...` whether it
comes from Python or from the command line (which prints it on one line and exits with status 2).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_float", "check_bool", "check_choice", "check_distinct_choices", "check_known"]


def check_int(name: str, value, low: int | None = None, high: int | None = None,
              allow_none: bool = False) -> None:
    """Raise TypeError unless `value` is an int (a numpy integer too; None too with `allow_none`), ValueError
    unless in [low, high]."""
    if value is None and allow_none:
        return
    if low is not None and high is not None:
        wanted = f"an int in [{low}, {high}]"
    elif low is not None:
        wanted = f"an int >= {low}"
    else:
        wanted = "an int"
    wanted = f"None or {wanted}" if allow_none else wanted
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be {wanted}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} must be {wanted}")


def check_float(name: str, value, low: float = -math.inf, high: float = math.inf,
                open_low: bool = False) -> None:
    """Raise TypeError unless `value` is a real number (int or float), ValueError unless finite and in
    [low, high] (or (low, high] with `open_low`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    bad_low = value <= low if open_low else value < low
    if not math.isfinite(value) or bad_low or value > high:
        if high == math.inf:
            wanted = "" if low == -math.inf else f" {'>' if open_low else '>='} {low}"
        else:
            wanted = f" in {'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name}={value} must be a finite number{wanted}")


def check_bool(name: str, value) -> None:
    """Raise TypeError unless `value` is a bool (0/1 and 'true' are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def check_choice(name: str, value, choices) -> None:
    """Raise ValueError unless `value` is one of `choices` (a tuple or list, shown as given)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}")


def check_distinct_choices(name: str, values, choices) -> None:
    """Raise TypeError unless `values` is a list or tuple (a str is not), ValueError unless its items are
    distinct members of `choices` (the unknown ones named). An empty `values` passes (check that apart)."""
    choices = list(choices)  # compared by ==, so an unhashable item is reported, not a hashing error
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name}={values!r} must be a list of distinct values from {choices}")
    unknown = [v for v in values if v not in choices]
    if unknown or len(set(values)) != len(values):  # all known: hashable like the choices
        raise ValueError(f"{name}={list(values)} must be distinct values from {choices}"
                         + (f"; unknown: {unknown}" if unknown else ""))


def check_known(where: str, values: dict, valid) -> None:
    """Raise ValueError naming each key of `values` not in `valid`, with its value: "unknown option(s) ['x']
    for <where> (x=1); valid options: [...]"."""
    unknown = sorted(set(values) - set(valid))
    if unknown:
        given = ", ".join(f"{name}={values[name]!r}" for name in unknown)
        raise ValueError(f"unknown option(s) {unknown} for {where} ({given}); valid options: {sorted(valid)}")
