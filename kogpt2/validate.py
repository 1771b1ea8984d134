"""One way to validate config fields: errors name ``Owner.field=value`` and what is allowed.

``bool`` is never an integer or a number here (``True`` is not a batch size), and numbers
must be finite. Used by every frozen config's ``__post_init__``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return (
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_))
        and math.isfinite(float(v))
    )


def _fail(owner: str, name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{owner}.{name}={value!r}: must be {rule}")


def check_int(
    owner: str, name: str, value: Any, *, low: int | None = None, high: int | None = None, note: str = ""
) -> None:
    """``value`` is an integer in ``[low, high]`` (either bound optional).

    Raises:
        ValueError: ``Owner.name=value: must be ...``.
    """
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            rule = f"an integer in [{low}, {high}]"
        elif low is not None:
            rule = f"an integer >= {low}"
        elif high is not None:
            rule = f"an integer <= {high}"
        else:
            rule = "an integer"
        raise _fail(owner, name, value, rule + (f" ({note})" if note else ""))


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
) -> None:
    """``value`` is a finite number within the bounds given.

    Raises:
        ValueError: ``Owner.name=value: must be ...``.
    """
    ok = is_number(value)
    if ok and gt is not None and not value > gt:
        ok = False
    if ok and ge is not None and not value >= ge:
        ok = False
    if ok and le is not None and not value <= le:
        ok = False
    if ok and lt is not None and not value < lt:
        ok = False
    if not ok:
        parts = [
            f"> {gt}" if gt is not None else "",
            f">= {ge}" if ge is not None else "",
            f"<= {le}" if le is not None else "",
            f"< {lt}" if lt is not None else "",
        ]
        bounds = " and ".join(p for p in parts if p)
        rule = f"a finite number{' ' + bounds if bounds else ''}"
        raise _fail(owner, name, value, rule + (f" ({note})" if note else ""))


def check_bool(owner: str, name: str, value: Any) -> None:
    """``value`` is ``True`` or ``False`` (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise _fail(owner, name, value, "True or False")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise _fail(owner, name, value, f"one of {options}")
