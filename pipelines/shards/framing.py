"""Examples a batch at a time (numpy), framed as TFRecords: the vectorized half of the per-example contract.

:mod:`kogpt2.records` says what one example is (frame, fit, pad, pack, split and shard, the
``tf.train.Example`` bytes). The functions here do the same on thousands of sequences at once,
held as one flat ``int64`` array of ids with their lengths (:func:`flatten`), and give exactly
the bytes of their one-at-a-time counterparts (the tests compare them):
:func:`frame_flat`, :func:`truncate_flat`, :func:`fit_batch`, :func:`pack_array`,
:func:`split_masks`, and :func:`tfrecord_example_batch`, which serializes, pads and frames a
whole batch as TFRecords (length, masked CRC32C, data, masked CRC32C) with no Python code per
id. TFRecord framing itself is here too (:func:`tfrecord_frame`, with ``google-crc32c``):
byte-identical to ``tf.io.TFRecordWriter``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from kogpt2 import records
from kogpt2.protowire import varint


def fit_batch(seqs: Sequence[Sequence[int]], max_len: int, overflow: str = "truncate") -> tuple[list[int], list[Any]]:
    """:func:`kogpt2.records.fit` over many framed sequences.

    Returns:
        ``(owners, pieces)``: the pieces in order, and for each the index of its sequence
        (several per sequence with ``window``). Sequences that fit are passed through as they are.

    Raises:
        ValueError: unknown ``overflow``.
    """
    if overflow not in records.OVERFLOW_MODES:
        raise ValueError(f"overflow={overflow!r}: must be one of {records.OVERFLOW_MODES}")
    if all(len(s) <= max_len for s in seqs):
        return list(range(len(seqs))), list(seqs)
    owners: list[int] = []
    pieces: list[Any] = []
    for i, seq in enumerate(seqs):
        fitted = [seq] if len(seq) <= max_len else records.fit(seq, max_len, overflow)
        owners.extend([i] * len(fitted))
        pieces.extend(fitted)
    return owners, pieces


_VARINT_MAX_BYTES = 5  # the vectorized path: values in [0, 2**35); others go one by one


def flatten(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged sequences as one ``int64`` array of every id and the ``lengths``."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    return np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum())), lengths


def unflatten(flat: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """The inverse of :func:`flatten`."""
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    ids = flat.tolist()
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def frame_flat(flat: np.ndarray, lengths: np.ndarray, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kogpt2.records.frame` over flattened sequences: ``<s>`` + ids + ``</s>`` each."""
    framed_lengths = lengths + 2
    ends = np.cumsum(framed_lengths)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    inner = np.ones(len(out), dtype=bool)
    inner[ends - framed_lengths] = False
    inner[ends - 1] = False
    out[ends - framed_lengths] = bos_id
    out[ends - 1] = eos_id
    out[inner] = flat
    return out, framed_lengths


def truncate_flat(flat: np.ndarray, lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kogpt2.records.truncate` over flattened sequences: each keeps its first ``max_len`` ids."""
    if not len(lengths) or int(lengths.max()) <= max_len:
        return flat, lengths
    starts = np.cumsum(lengths) - lengths
    return flat[np.arange(len(flat)) - np.repeat(starts, lengths) < max_len], np.minimum(lengths, max_len)


def tfrecord_example_batch(
    flat: np.ndarray, lengths: np.ndarray, max_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Framed TFRecords of padded examples, vectorized, as one buffer: no Python code runs per id.

    Each record is its TFRecord header and the Example up to its first id, the ids' varints, the
    padding and ``length`` feature, and the masked CRC32C. The parts around the ids depend only
    on (varint bytes, length), so they are made once per such pair. A batch is laid out as a
    table, one row per record (those parts and a slot of varint bytes per id), with a mask of the
    bytes each row uses: the records are the masked bytes in row order. Only the CRC is computed
    per record (``google-crc32c``, in C).

    Args:
        flat: the ids of every sequence, concatenated (:func:`flatten`); none longer than ``max_len``.
        lengths: each sequence's length.
        max_len: ids per example; shorter sequences are padded with ``pad_id``.
        pad_id: the padding id.

    Returns:
        ``(data, sizes)``: the framed records concatenated (uint8) and each one's size; byte-identical
        to the one-at-a-time functions.

    Raises:
        ValueError: a sequence is longer than ``max_len``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if not n:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64)
    if int(lengths.max()) > max_len:
        raise ValueError(f"sequence of {int(lengths.max())} tokens does not fit max_len={max_len}; fit() it first")
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= 1 << (7 * _VARINT_MAX_BYTES)) or pad_id < 0:
        examples = [records.serialize_example(*records.pad(seq, max_len, pad_id)) for seq in unflatten(flat, lengths)]
        frames = tfrecord_frames(examples)
        return np.frombuffer(b"".join(frames), dtype=np.uint8), np.fromiter(map(len, frames), np.int64, n)
    rows = max(1, _TABLE_SLOTS // max_len)  # a table of at most about _TABLE_SLOTS ids at a time
    if n > rows:
        ends = np.cumsum(lengths)
        chunks = []
        for a in range(0, n, rows):
            b = min(n, a + rows)
            lo, hi = int(ends[a - 1]) if a else 0, int(ends[b - 1])
            chunks.append(tfrecord_example_batch(flat[lo:hi], lengths[a:b], max_len, pad_id))
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    top = int(flat.max()) if len(flat) else 0
    width = 1
    while width < _VARINT_MAX_BYTES and top >= 1 << (7 * width):
        width += 1
    dtype = np.uint32 if width <= 4 else np.uint64
    used = np.arange(max_len) < lengths[:, None]  # (n, max_len): the id slots each record fills
    ids = np.zeros((n, max_len), dtype=dtype)
    ids[used] = flat
    needed = used.astype(np.uint8)  # bytes of each id's varint (0 for an empty slot)
    for k in range(1, width):
        needed += (ids >= (1 << (7 * k))) & used
    # each id's varint, a byte plane at a time: 7 bits a byte, low bits first, the top bit set on
    # all but its last byte
    planes = [
        ((ids >> (7 * k)) & 0x7F).astype(np.uint8) | ((needed > k + 1).astype(np.uint8) << 7) for k in range(width)
    ]
    varint = np.stack(planes, axis=-1).reshape(n, -1)
    varint_used = np.stack([needed > k for k in range(width)], axis=-1).reshape(n, -1)
    body_lens = needed.sum(axis=1, dtype=np.int64)
    kinds, which = np.unique(body_lens * (max_len + 1) + lengths, return_inverse=True)
    parts = _PARTS.get((max_len, pad_id))
    if parts is None:
        parts = _PARTS[(max_len, pad_id)] = _ExampleParts(max_len, pad_id)
    row = parts.rows(kinds.tolist())[which]
    head_lens, tail_lens = parts.head_lens[row], parts.tail_lens[row]
    table = np.concatenate([parts.heads[row], varint, parts.tails[row], np.zeros((n, TFRECORD_TAIL), np.uint8)], axis=1)
    mask = np.concatenate(
        [
            np.arange(parts.heads.shape[1]) < head_lens[:, None],
            varint_used,
            np.arange(parts.tails.shape[1]) < tail_lens[:, None],
            np.ones((n, TFRECORD_TAIL), dtype=bool),
        ],
        axis=1,
    )
    data = table[mask]
    sizes = head_lens + body_lens + tail_lens + TFRECORD_TAIL
    ends = np.cumsum(sizes)
    _put_crcs(data, ends - sizes + TFRECORD_HEAD, ends - TFRECORD_TAIL)
    return data, sizes


#: Ids laid out at once by :func:`tfrecord_example_batch` (bounds its memory: a few bytes each).
_TABLE_SLOTS = 1 << 18


class _ExampleParts:
    """The bytes around the ids of padded examples, one row per kind (``body bytes * (max_len + 1) + length``).

    ``heads``: the TFRecord header and the Example up to its first id; ``tails``: the padding and
    the ``length`` feature; zero-padded rows, with their lengths. Rows are added as kinds appear.
    """

    def __init__(self, max_len: int, pad_id: int):
        self.max_len, self.pad_id = max_len, pad_id
        self.index: dict[int, int] = {}
        self.parts: list[tuple[bytes, bytes]] = []
        self.heads = self.tails = np.zeros((0, 0), dtype=np.uint8)
        self.head_lens = self.tail_lens = np.zeros(0, dtype=np.int64)

    def rows(self, kinds: list[int]) -> np.ndarray:
        """The row of each kind."""
        index = self.index
        missing = [k for k in kinds if k not in index]
        if missing:
            for kind in missing:
                prefix, tail, head = _example_parts(*divmod(kind, self.max_len + 1), self.max_len, self.pad_id)
                index[kind] = len(self.parts)
                self.parts.append((head + prefix, tail))
            (self.heads, self.head_lens), (self.tails, self.tail_lens) = (
                _rows([p[i] for p in self.parts]) for i in (0, 1)
            )
        return np.fromiter(map(index.__getitem__, kinds), np.int64, len(kinds))


def _rows(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings as zero-padded rows of a table, and their lengths."""
    lens = np.fromiter(map(len, parts), np.int64, len(parts))
    rows = np.zeros((len(parts), int(lens.max())), dtype=np.uint8)
    rows[np.arange(rows.shape[1]) < lens[:, None]] = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return rows, lens


def _put_crcs(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    """Write the masked CRC32C of each ``data[start:end]`` into the 4 bytes at ``end`` (little-endian)."""
    import google_crc32c

    value = google_crc32c.value
    whole = data.tobytes()  # google-crc32c takes bytes only
    crcs = np.fromiter(
        map(value, map(whole.__getitem__, map(slice, starts.tolist(), ends.tolist()))), np.uint64, len(ends)
    )
    masked = (((crcs >> np.uint64(15)) | (crcs << np.uint64(17))) + np.uint64(_MASK_DELTA)) & np.uint64(0xFFFFFFFF)
    data[ends[:, None] + np.arange(4)] = masked.astype("<u4").view(np.uint8).reshape(-1, 4)


#: ``(max_len, pad_id) ->`` what padded examples add around their ids.
_PARTS: dict[tuple[int, int], _ExampleParts] = {}


def _example_parts(body_len: int, length: int, max_len: int, pad_id: int) -> tuple[bytes, bytes, bytes]:
    """The bytes around the varints (``body_len`` bytes) of a padded example's real ids.

    Returns:
        ``(prefix, tail, header)``: the Example up to its first id, the padding and ``length``
        feature after the real ids, and the TFRecord header of the whole.
    """
    pad_byte = varint(pad_id)
    suffix = records.example_suffix(length)
    packed = body_len + (max_len - length) * len(pad_byte)
    prefix = records.example_prefix(packed, len(suffix))
    tail = pad_byte * (max_len - length) + suffix
    return prefix, tail, tfrecord_frame(b"\0" * (len(prefix) + body_len + len(tail)))[:TFRECORD_HEAD]


def pack_array(ids: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a stream of token ids into full ``max_len`` blocks (the streaming core of :func:`kogpt2.records.pack`).

    Returns:
        ``(blocks [n, max_len], rest)``: the full blocks, and the ids left over for the next call.
    """
    full = len(ids) // max_len
    return ids[: full * max_len].reshape(full, max_len), ids[full * max_len :]


# --- TFRecord framing -------------------------------------------------------------------

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``: ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2**32)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC of the length, the data, masked CRC of the data (little-endian)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


#: Bytes TFRecord framing adds before a record's data, and after it.
TFRECORD_HEAD, TFRECORD_TAIL = 12, 4


def tfrecord_frames(payloads: Sequence[bytes]) -> list[bytes]:
    """:func:`tfrecord_frame` of each record (the header of each length computed once)."""
    import google_crc32c

    value = google_crc32c.value
    headers: dict[int, bytes] = {}
    out = []
    for data in payloads:
        n = len(data)
        head = headers.get(n)
        if head is None:
            length = struct.pack("<Q", n)
            head = headers[n] = length + struct.pack("<I", masked_crc32c(length))
        crc = value(data)
        out.append(head + data + ((((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF).to_bytes(4, "little"))
    return out


def split_masks(
    digests: Sequence[bytes], val_fraction: float, num_shards: Sequence[int]
) -> tuple[list[int], list[int]]:
    """:func:`kogpt2.records.assign_split` and :func:`~kogpt2.records.assign_shard` over many digests.

    Args:
        digests: :func:`kogpt2.records.stable_hash` digests (16 bytes each).
        val_fraction: validation share.
        num_shards: shards of ``(train, validation)``.

    Returns:
        ``(splits, shards)``: per digest 0 (train) or 1 (validation), and its shard index in that split.
    """
    if not digests:
        return [], []
    words = np.frombuffer(b"".join(digests), dtype=">u8").reshape(len(digests), 2)
    # an integer x is below the float f = val_fraction * 2**64 exactly when x < ceil(f)
    threshold = math.ceil(val_fraction * 2**64)
    splits = (words[:, 0] < np.uint64(threshold)).astype(np.int64) if threshold else np.zeros(len(digests), np.int64)
    counts = np.asarray(num_shards, dtype=np.uint64)[splits]
    shards = (words[:, 1] % np.maximum(counts, np.uint64(1))).astype(np.int64)
    return splits.tolist(), shards.tolist()
