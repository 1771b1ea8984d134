"""Protocol-buffer wire format: base-128 varints, read and written (no protobuf library needed).

Used for ``tf.train.Example`` records (:mod:`kogpt2.records`) and SentencePiece model files
(:mod:`kogpt2.tokenizer`).
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    """Protocol-buffer base-128 varint; negative int64 as its 64-bit two's complement."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint starting at ``data[pos]``: ``(value, position after it)``."""
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
