"""Sorted-run records: a fixed-length sort key, the payload's length, the payload.

What preprocessing's steps emit and :mod:`pipelines.sorted_shards` sorts and merges; a
module of its own so that reading (:mod:`pipelines.textio`) and merging need not import each
other.
"""

from __future__ import annotations

#: Bytes of a record's sort key.
KEY_LEN = 20


def run_record(key: bytes, payload: bytes) -> bytes:
    """One sorted-run record: ``key`` (KEY_LEN bytes) + payload length + payload."""
    return key + len(payload).to_bytes(4, "big") + payload


def record_payload(record: bytes) -> bytes:
    """The payload of a :func:`run_record`."""
    return record[KEY_LEN + 4 :]
