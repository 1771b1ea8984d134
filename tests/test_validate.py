"""kogpt2.validate: one way to check config fields; errors name ``Owner.field=value`` and every bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kogpt2.validate import check_bool, check_choice, check_int, check_number, is_int, is_number


def test_bools_are_never_integers_or_numbers() -> None:
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(np.bool_(True)) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and is_number(np.float32(0.5))
    assert not is_number(True) and not is_number(math.nan) and not is_number(math.inf) and not is_number("1")


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"low": 1}, 0, "C.n=0: must be an integer >= 1"),
        ({"high": 9}, 10, "C.n=10: must be an integer <= 9"),
        ({"low": 1, "high": 9}, 10, r"C.n=10: must be an integer in \[1, 9\]"),
        ({}, 1.5, "C.n=1.5: must be an integer$"),
        ({"low": 1, "note": "lines"}, True, r"C.n=True: must be an integer >= 1 \(lines\)"),
    ],
)
def test_check_int_names_the_field_the_value_and_the_bounds(kwargs: dict, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_int("C", "n", value, **kwargs)


def test_check_int_accepts_values_within_the_bounds() -> None:
    for value in (1, 5, 9, np.int32(9)):
        check_int("C", "n", value, low=1, high=9)


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"gt": 0, "lt": 1}, 1.5, r"C.x=1.5: must be a finite number > 0 and < 1$"),  # the upper bound is named too
        ({"gt": 0, "lt": 1}, 0, r"C.x=0: must be a finite number > 0 and < 1$"),
        ({"ge": 0, "lt": 1}, 1.0, r"C.x=1.0: must be a finite number >= 0 and < 1$"),
        ({"ge": 0, "le": 1}, 2, r"C.x=2: must be a finite number >= 0 and <= 1$"),
        ({"lt": 1}, 1, r"C.x=1: must be a finite number < 1$"),
        ({}, math.nan, r"C.x=nan: must be a finite number$"),
        ({"gt": 0, "note": "MiB"}, -1, r"C.x=-1: must be a finite number > 0 \(MiB\)$"),
        ({"gt": 0}, False, r"C.x=False: must be a finite number > 0$"),
    ],
)
def test_check_number_names_the_field_the_value_and_every_bound(kwargs: dict, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_number("C", "x", value, **kwargs)


def test_check_number_accepts_values_within_the_bounds() -> None:
    check_number("C", "x", 0.5, gt=0, lt=1)
    check_number("C", "x", 0, ge=0, le=1)
    check_number("C", "x", 1, ge=0, le=1)
    check_number("C", "x", np.float64(1e-4), gt=0)


def test_learning_rate_message_says_it_must_be_below_1() -> None:
    from kogpt2.train_config import TrainConfig

    with pytest.raises(ValueError, match=r"TrainConfig\.learning_rate=1\.5: must be a finite number > 0 and < 1"):
        TrainConfig(data="d", model="tiny", output="o", learning_rate=1.5)


def test_check_bool_and_check_choice() -> None:
    check_bool("C", "b", False)
    for value in (0, 1, "yes", None):
        with pytest.raises(ValueError, match=r"C.b=.*: must be True or False"):
            check_bool("C", "b", value)
    check_choice("C", "mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match=r"C.mode='c': must be one of \('a', 'b'\)"):
        check_choice("C", "mode", "c", iter(["a", "b"]))
