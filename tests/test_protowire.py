"""kogpt2.protowire: base-128 varints as protocol buffers write them."""

from __future__ import annotations

import pytest

from kogpt2.protowire import read_varint, varint


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (2**63 - 1, b"\xff" * 8 + b"\x7f"),
    ],
)
def test_varint_known_encodings(value: int, encoded: bytes) -> None:
    assert varint(value) == encoded
    assert read_varint(b"junk" + encoded + b"more", 4) == (value, 4 + len(encoded))


def test_negative_int64_is_its_twos_complement_in_ten_bytes() -> None:
    assert varint(-1) == b"\xff" * 9 + b"\x01"
    value, end = read_varint(varint(-(2**63)), 0)
    assert end == 10 and value - (1 << 64) == -(2**63)
