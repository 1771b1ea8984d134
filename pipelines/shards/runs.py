"""Sorted-run records: a fixed-length sort key, the payload's length, the payload.

What preprocessing's steps emit and :mod:`pipelines.shards.spill` sorts and merges; a
module of its own so that reading (:mod:`pipelines.shards.textio`) and merging need not import
each other.

Records travel in batches (:class:`RunBatch`): a column of keys, a column of payload sizes and
the payloads concatenated, so that sorting, gathering and writing them are numpy operations on
whole batches rather than Python code per record. Their order is that of the record bytes
(:func:`run_record`): by key, then payload length, then payload, a total order, so the output is
the same whatever order the records arrived in.

On disk, a run is a sequence of blocks: record count (4 bytes, big-endian), the keys, the sizes
(4 bytes each, big-endian), the payloads (:func:`encode_blocks`, :func:`decode_blocks`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

#: Bytes of a record's sort key.
KEY_LEN = 20
#: Bytes a record's key and size take in a block.
RECORD_HEAD = KEY_LEN + 4
_KEY_AND_SIZE = np.dtype(f"S{RECORD_HEAD}")


def run_record(key: bytes, payload: bytes) -> bytes:
    """One sorted-run record: ``key`` (KEY_LEN bytes) + payload length + payload."""
    return key + len(payload).to_bytes(4, "big") + payload


def split_buffer(data: bytes, sizes: np.ndarray) -> list[bytes]:
    """Cut ``data`` into consecutive pieces of ``sizes`` bytes."""
    ends = np.cumsum(sizes).tolist()
    return [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


class RunBatch(NamedTuple):
    """Run records as columns.

    Attributes:
        keys: ``(n, KEY_LEN)`` uint8, one sort key per row.
        sizes: ``(n,)`` int64 payload sizes.
        data: the payloads concatenated (uint8).
    """

    keys: np.ndarray
    sizes: np.ndarray
    data: np.ndarray

    @property
    def n_records(self) -> int:
        return len(self.sizes)

    @property
    def nbytes(self) -> int:
        """Bytes the batch holds (and, with a block header, writes)."""
        return len(self.data) + RECORD_HEAD * len(self.sizes)

    def take(self, index: np.ndarray) -> RunBatch:
        """The records at ``index``, in that order."""
        return RunBatch(self.keys[index], self.sizes[index], take_pieces(self.data, self.sizes, index))

    def slice(self, start: int, stop: int) -> RunBatch:
        """Records ``start`` to ``stop`` (a view: nothing is copied)."""
        ends = np.cumsum(self.sizes)
        a = int(ends[start - 1]) if start else 0
        b = int(ends[stop - 1]) if stop else 0
        return RunBatch(self.keys[start:stop], self.sizes[start:stop], self.data[a:b])

    def payloads(self) -> list[bytes]:
        """Each record's payload."""
        return split_buffer(self.data.tobytes(), self.sizes)

    def records(self) -> list[bytes]:
        """Each record as :func:`run_record` bytes."""
        keys = self.keys.tobytes()
        return [run_record(keys[i * KEY_LEN : (i + 1) * KEY_LEN], payload) for i, payload in enumerate(self.payloads())]

    def order_keys(self, groups: np.ndarray | None = None) -> np.ndarray:
        """Key and big-endian size of each record as one fixed-width byte string (:func:`order_keys`)."""
        return order_keys(self.keys, self.sizes, groups)


def order_keys(keys: np.ndarray, sizes: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Key and big-endian size of each record as one fixed-width byte string: their order is the records' (ties aside).

    With ``groups`` (small non-negative integers, one per record), the group comes first.
    """
    lead = 0 if groups is None else 4
    both = np.empty((len(sizes), lead + RECORD_HEAD), dtype=np.uint8)
    if groups is not None:
        both[:, :4] = np.asarray(groups, dtype=">u4").view(np.uint8).reshape(-1, 4)
    both[:, lead : lead + KEY_LEN] = keys
    both[:, lead + KEY_LEN :] = np.asarray(sizes).astype(">u4").view(np.uint8).reshape(-1, 4)
    return both.view(np.dtype(f"S{lead + RECORD_HEAD}")).reshape(-1)


def take_pieces(data: np.ndarray, sizes: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The pieces (consecutive, of ``sizes``) of ``data`` at ``index``, concatenated in that order.

    Cut into ``bytes`` and joined in C: for pieces of tens to hundreds of bytes this measured
    faster than numpy index arithmetic per byte or a padded table of rows.
    """
    if not len(index):
        return data[:0]
    pieces = split_buffer(data.tobytes(), sizes)
    return np.frombuffer(b"".join(map(pieces.__getitem__, np.asarray(index).tolist())), dtype=np.uint8)


class FileBatch(NamedTuple):
    """Run records bound for several output files: ``batch``'s record i goes to ``names[files[i]]``."""

    names: tuple[str, ...]
    files: np.ndarray
    batch: RunBatch

    @classmethod
    def of(cls, name: str, batch: RunBatch | Sequence[bytes]) -> FileBatch:
        """Records (a batch, or a list of :func:`run_record` records) all bound for ``name``."""
        if not isinstance(batch, RunBatch):
            batch = batch_from_records(batch)
        return cls((name,), np.zeros(batch.n_records, dtype=np.int64), batch)


def empty_batch() -> RunBatch:
    return RunBatch(np.zeros((0, KEY_LEN), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.uint8))


def batch_of(keys: np.ndarray, payloads: np.ndarray, sizes: np.ndarray) -> RunBatch:
    """A batch from keys (``(n, KEY_LEN)`` uint8), payloads concatenated and their sizes."""
    return RunBatch(np.ascontiguousarray(keys, dtype=np.uint8), np.asarray(sizes, dtype=np.int64), payloads)


def batch_from_records(records: Sequence[bytes]) -> RunBatch:
    """A batch of :func:`run_record` records."""
    if not records:
        return empty_batch()
    keys = np.frombuffer(b"".join([r[:KEY_LEN] for r in records]), dtype=np.uint8).reshape(-1, KEY_LEN)
    payloads = [r[RECORD_HEAD:] for r in records]
    sizes = np.fromiter(map(len, payloads), np.int64, len(payloads))
    return RunBatch(keys, sizes, np.frombuffer(b"".join(payloads), dtype=np.uint8))


def concat(batches: Sequence[RunBatch]) -> RunBatch:
    """The records of several batches, one after the other."""
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return empty_batch()
    return RunBatch(
        np.concatenate([b.keys for b in batches]),
        np.concatenate([b.sizes for b in batches]),
        np.concatenate([b.data for b in batches]),
    )


def sort_order(batch: RunBatch, groups: np.ndarray | None = None) -> np.ndarray:
    """The indices that put a batch in record order: key, size, then payload (exact, a total order).

    With ``groups`` (small non-negative integers), records are ordered by group first.
    """
    return order_of(batch.keys, batch.sizes, lambda: split_buffer(batch.data.tobytes(), batch.sizes), groups)


def order_of(
    keys: np.ndarray,
    sizes: np.ndarray,
    payloads: Callable[[], Sequence[bytes]],
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`sort_order` of records given as columns; ``payloads()`` is called only if two records tie on key and size."""
    head = order_keys(keys, sizes, groups)
    order = np.argsort(head, kind="stable")
    ranked = head[order]
    tied = np.flatnonzero(ranked[1:] == ranked[:-1])
    if not len(tied):
        return order
    # equal key and size: equal records (the same text twice) need nothing; others go by payload
    pieces = payloads()
    get = pieces.__getitem__
    a, b = order[tied].tolist(), order[tied + 1].tolist()
    differ = ~np.fromiter(map(operator.eq, map(get, a), map(get, b)), dtype=bool, count=len(a))
    if differ.any():
        group = np.cumsum(np.r_[0, ranked[1:] != ranked[:-1]])
        for g in np.unique(group[tied[differ]]).tolist():
            at = np.flatnonzero(group == g)
            order[at] = sorted(order[at].tolist(), key=lambda i: (pieces[i], i))
    return order


def sorted_batch(batch: RunBatch) -> RunBatch:
    """The batch in record order (:func:`sort_order`)."""
    return batch.take(sort_order(batch))


def count_at_most(batch: RunBatch, bound: tuple[bytes, bytes]) -> int:
    """How many records of a sorted batch are at or below ``bound`` (``(key + size, payload)``)."""
    head = batch.order_keys()
    key = np.array([bound[0]], dtype=_KEY_AND_SIZE)
    below = int(np.searchsorted(head, key, side="left")[0])
    upto = int(np.searchsorted(head, key, side="right")[0])
    if upto == below:
        return below
    # records with the bound's key and size: compare payloads (few)
    tie = batch.slice(below, upto).payloads()
    return below + sum(p <= bound[1] for p in tie)


def last_record(batch: RunBatch) -> tuple[bytes, bytes]:
    """``(key + size, payload)`` of a batch's last record: what :func:`count_at_most` compares."""
    n = batch.n_records
    return batch.order_keys()[n - 1 : n].tobytes(), batch.slice(n - 1, n).data.tobytes()


# --- blocks on disk ---------------------------------------------------------------------


def _block_spans(sizes: np.ndarray, block_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive records filling blocks of about ``block_bytes`` (at least one record each)."""
    ends = np.cumsum(sizes + RECORD_HEAD)
    n, start = len(sizes), 0
    while start < n:
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + block_bytes, side="right")))
        yield start, stop
        start = stop


def _block(keys: np.ndarray, sizes: np.ndarray, payloads: bytes) -> bytes:
    """One block on disk: record count, keys, sizes (big-endian), payloads."""
    return b"".join((len(sizes).to_bytes(4, "big"), keys.tobytes(), sizes.astype(">u4").tobytes(), payloads))


def encode_blocks(batch: RunBatch, block_bytes: int) -> Iterator[bytes]:
    """A batch as blocks of about ``block_bytes`` (at least one record each), ready to write."""
    offsets = np.r_[0, np.cumsum(batch.sizes)]
    for start, stop in _block_spans(batch.sizes, block_bytes):
        payloads = batch.data[int(offsets[start]) : int(offsets[stop])].tobytes()
        yield _block(batch.keys[start:stop], batch.sizes[start:stop], payloads)


def encode_pieces(
    keys: np.ndarray, sizes: np.ndarray, pieces: Sequence[bytes], index: np.ndarray, block_bytes: int
) -> Iterator[bytes]:
    """Records ``index`` of columns whose payloads are ``pieces``, in that order, as :func:`encode_blocks` writes them."""
    for start, stop in _block_spans(sizes[index], block_bytes):
        at = index[start:stop]
        yield _block(keys[at], sizes[at], b"".join(map(pieces.__getitem__, at.tolist())))


def decode_blocks(buf: bytes) -> tuple[list[RunBatch], int]:
    """The whole blocks at the start of ``buf``, and how many bytes they take."""
    out = []
    pos, size = 0, len(buf)
    while pos + 4 <= size:
        n = int.from_bytes(buf[pos : pos + 4], "big")
        head_end = pos + 4 + RECORD_HEAD * n
        if head_end > size:
            break
        keys = np.frombuffer(buf, dtype=np.uint8, count=KEY_LEN * n, offset=pos + 4).reshape(n, KEY_LEN)
        sizes = np.frombuffer(buf, dtype=">u4", count=n, offset=pos + 4 + KEY_LEN * n).astype(np.int64)
        end = head_end + int(sizes.sum())
        if end > size:
            break
        out.append(RunBatch(keys, sizes, np.frombuffer(buf, dtype=np.uint8, count=end - head_end, offset=head_end)))
        pos = end
    return out, pos
