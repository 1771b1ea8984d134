"""Deterministic shard writing through sorted runs: spill, merge, write.

Each worker buffers run records per output file, sorts them by key and spills them as
sorted runs to ``_spill-*`` files (:class:`SpillRuns`); one task per output file merges its
runs, streaming, and writes the file (:class:`WriteShards`): a gzip TFRecord shard or the
rejected-lines JSONL. The output is byte-identical whatever order the runner used, and
memory stays flat because records never pass through an in-memory shuffle.

Records travel and are stored as columns (:class:`pipelines.run_records.RunBatch`): sorting a
buffer, merging runs and writing a shard are numpy operations on thousands of records at a time.
Their order is a total order (key, then payload length, then payload).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from kogpt2 import records
from kogpt2.records import split_buffer
from pipelines.common import join
from pipelines.run_records import (
    FileBatch,
    RunBatch,
    concat,
    count_at_most,
    decode_blocks,
    encode_blocks,
    encode_pieces,
    last_record,
    order_of,
    sorted_batch,
)
from pipelines.textio import REJECTED_FILE, write_rejected

SPILL_PREFIX = "_spill-"
#: A sorted run is merged with at most this many others at once (open files per task).
MAX_FANIN = 64
#: Bytes read from a sorted run at a time when merging (at most: see :func:`merge_read_block`).
READ_BLOCK = 1 << 20
#: Bytes of run records a merge holds at once, over all its runs: each run's read block is this
#: shared out (down to MIN_READ_BLOCK), so a merge's memory, and the size of the lists it yields,
#: does not grow with the number of runs (which grows with the corpus).
MERGE_BUDGET = 4 << 20
#: The smallest read block per run (so MAX_FANIN runs hold at most MAX_FANIN * 64 KiB).
MIN_READ_BLOCK = 64 << 10

#: A sorted run section: (run file path, offset, bytes, records).
RunRef = tuple[str, int, int, int]


def spill_prefix(output: str, run_id: str) -> str:
    """Where a run's sorted-run files go: ``output/_spill-RUNID-``."""
    return join(output, f"{SPILL_PREFIX}{run_id}-")


def delete_spills(output: str) -> None:
    """Remove every ``_spill-*`` file from ``output``."""
    spills = [m.path for m in FileSystems.match([join(output, SPILL_PREFIX + "*")])[0].metadata_list]
    if spills:
        FileSystems.delete(spills)


# --- sorted run files ------------------------------------------------------------------

#: Bytes of run records per block of a run file: the unit a merge reads.
RUN_BLOCK = 64 << 10


def _create_run(prefix: str) -> tuple[str, Any]:
    """A new sorted-run file: its path and the open file."""
    path = f"{prefix}{uuid.uuid4().hex}.runs"
    return path, FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _write_blocks(f: Any, blocks: Iterable[bytes]) -> int:
    """Write blocks; return the bytes written."""
    nbytes = 0
    for block in blocks:
        f.write(block)
        nbytes += len(block)
    return nbytes


def write_run(prefix: str, batches: Iterable[RunBatch]) -> RunRef:
    """Write sorted batches as a new run file; return its section."""
    path, f = _create_run(prefix)
    nbytes = count = 0
    with f:
        for batch in batches:
            nbytes += _write_blocks(f, encode_blocks(batch, RUN_BLOCK))
            count += batch.n_records
    return (path, 0, nbytes, count)


def _read_blocks(ref: RunRef, block: int = 0) -> Iterator[RunBatch]:
    """The records of one sorted run section ``(path, offset, bytes, records)``, about ``block`` bytes at a time."""
    path, offset, nbytes, _ = ref
    block = max(block or READ_BLOCK, RUN_BLOCK)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.seek(offset)
        left = nbytes
        buf = b""
        while left > 0:
            chunk = f.read(min(left, block))
            if not chunk:
                raise OSError(f"{path}: sorted run ends {left} bytes early")
            left -= len(chunk)
            buf = buf + chunk if buf else chunk
            batches, used = decode_blocks(buf)
            if batches:
                yield concat(batches)
            buf = buf[used:]
        if buf:
            raise OSError(f"{path}: truncated block at the end of a sorted run")


def merge_read_block(runs: int) -> int:
    """The read block per run of a merge of ``runs`` runs: :data:`MERGE_BUDGET` shared out.

    At most :data:`READ_BLOCK`, at least :data:`MIN_READ_BLOCK`.
    """
    return max(MIN_READ_BLOCK, min(READ_BLOCK, MERGE_BUDGET // max(1, runs)))


def merge_blocks(refs: Sequence[RunRef]) -> Iterator[RunBatch]:
    """The records of sorted run sections, merged in order, in batches.

    A block at a time from each run: every record up to the smallest of the blocks' last records
    is taken from each and sorted together (numpy), so no Python code runs per record. The
    blocks share :data:`MERGE_BUDGET` (:func:`merge_read_block`), so the records held, and each
    batch yielded, stay bounded however many runs are merged.
    """
    block = merge_read_block(len(refs))
    active: list[tuple[RunBatch, Iterator[RunBatch]]] = []
    for ref in refs:
        blocks = _read_blocks(ref, block)
        first = next(blocks, None)
        if first is not None and first.n_records:
            active.append((first, blocks))
    while active:
        if len(active) == 1:
            batch, blocks = active[0]
            yield batch
            yield from blocks
            return
        bound = min(last_record(batch) for batch, _ in active)
        taken: list[RunBatch] = []
        refill = []
        for batch, blocks in active:
            j = count_at_most(batch, bound)
            if j:
                taken.append(batch.slice(0, j))
            if j < batch.n_records:
                refill.append((batch.slice(j, batch.n_records), blocks))
            else:
                following = next(blocks, None)
                if following is not None and following.n_records:
                    refill.append((following, blocks))
        active = refill
        yield sorted_batch(concat(taken))


def _reduce_runs(refs: Sequence[RunRef], prefix: str) -> list[RunRef]:
    """More than MAX_FANIN runs first merged in groups into new runs under ``prefix`` (bounded open files)."""
    refs = list(refs)
    while len(refs) > MAX_FANIN:
        refs = [write_run(prefix, merge_blocks(refs[i : i + MAX_FANIN])) for i in range(0, len(refs), MAX_FANIN)]
    return refs


def merge_runs(refs: Sequence[RunRef], prefix: str) -> Iterator[RunBatch]:
    """The records of sorted runs, merged in order (more than MAX_FANIN runs in rounds), in batches."""
    return merge_blocks(_reduce_runs(refs, prefix))


# --- DoFns -----------------------------------------------------------------------------


class SpillRuns(beam.DoFn):
    """Buffer run records per output file, sort them and write them as sorted runs.

    Input: ``{output file name: RunBatch, or a list of run records}``, or a
    :class:`~pipelines.run_records.FileBatch` (records of several files in one batch). Output:
    ``(output file name, (run path, offset, bytes, records))`` per run section.
    """

    def __init__(self, prefix: str, buffer_bytes: int):
        self.prefix = prefix
        self.buffer_bytes = buffer_bytes

    def start_bundle(self) -> None:
        self._clear()

    def _clear(self) -> None:
        # the buffer as columns; payloads as bytes (about 40 bytes more a record than one array,
        # but sorted and written without a copy of the whole buffer)
        self.keys: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []
        self.files: list[np.ndarray] = []
        self.pieces: list[bytes] = []
        self.names: dict[str, int] = {}
        self.size = 0

    def process(self, items: dict[str, Any] | FileBatch) -> Iterator[tuple[str, RunRef]]:
        batches = [items] if isinstance(items, FileBatch) else [FileBatch.of(name, b) for name, b in items.items()]
        for fb in batches:
            number = np.array([self.names.setdefault(name, len(self.names)) for name in fb.names], np.int64)
            self.keys.append(fb.batch.keys)
            self.sizes.append(fb.batch.sizes)
            self.files.append(number[fb.files])
            self.pieces += split_buffer(fb.batch.data.tobytes(), fb.batch.sizes)
            self.size += fb.batch.nbytes
        if self.size >= self.buffer_bytes:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        for out in self._flush():
            yield GlobalWindows.windowed_value(out)

    def _flush(self) -> Iterator[tuple[str, RunRef]]:
        if not self.pieces:
            self._clear()
            return
        # files numbered in name order, so that a run's sections come in name order
        names = sorted(self.names)
        renumber = np.empty(len(names), np.int64)
        for i, name in enumerate(names):
            renumber[self.names[name]] = i
        files = renumber[np.concatenate(self.files)]
        keys, sizes, pieces = np.concatenate(self.keys), np.concatenate(self.sizes), self.pieces
        order = order_of(keys, sizes, lambda: pieces, files)
        bounds = np.searchsorted(files[order], np.arange(len(names) + 1))
        path, f = _create_run(self.prefix)
        offset = 0
        sections = []
        with f:
            for i, name in enumerate(names):
                a, b = int(bounds[i]), int(bounds[i + 1])
                if a == b:
                    continue
                nbytes = _write_blocks(f, encode_pieces(keys, sizes, pieces, order[a:b], RUN_BLOCK))
                sections.append((name, (path, offset, nbytes, b - a)))
                offset += nbytes
        self._clear()
        yield from sections


class WriteShards(beam.DoFn):
    """Merge the sorted runs of one output file and write it (TFRecord shard or rejected JSONL).

    Shard records hold framed TFRecords (:func:`kogpt2.records.tfrecord_example_batch`), or with
    ``packing`` token ids packed into ``max_len`` blocks here; the rejected
    file's hold dead-letter payloads (:mod:`pipelines.textio`). No TensorFlow: the gzip TFRecord
    file is written by :func:`write_tfrecord`.

    Input: ``(file name, [run refs, or None])``; side input: the line counts of every range.
    Output: ``{"name", "split", "examples", "sha256"}``.
    """

    def __init__(self, output: str, prefix: str, *, packing: bool, max_len: int, pad_id: int):
        self.output = output
        self.prefix = prefix
        self.packing = packing
        self.max_len = max_len
        self.pad_id = pad_id

    def process(
        self, element: tuple[str, Iterable[Any]], line_counts: list[tuple[str, int, int]]
    ) -> Iterator[dict[str, Any]]:
        name, refs = element
        merged = merge_runs(sorted(r for r in refs if r is not None), self.prefix)
        path = join(self.output, name)
        if name == REJECTED_FILE:
            payloads = (payload for batch in merged for payload in batch.payloads())
            yield {"name": name, "split": "rejected", **write_rejected(path, payloads, line_counts)}
            return
        chunks = (
            pack_chunks(merged, self.max_len, self.pad_id)
            if self.packing
            else ((batch.data, batch.sizes) for batch in merged)
        )
        yield {"name": name, "split": name.split("-", 1)[0], **write_tfrecord(path, chunks)}


#: Framed TFRecords: their bytes concatenated and each one's size.
Frames = tuple[Any, np.ndarray]


def frames_of(records_: Sequence[bytes]) -> Frames:
    """:data:`Frames` of a list of framed records."""
    return b"".join(records_), np.fromiter(map(len, records_), np.int64, len(records_))


def pack_chunks(batches: Iterable[RunBatch], max_len: int, pad_id: int) -> Iterator[Frames]:
    """Framed TFRecords of ``max_len`` blocks packed from batches of run records holding token ids.

    The same blocks as :func:`kogpt2.records.pack` over the sequences in order: only the last is padded.
    """
    rest = np.zeros(0, dtype=np.int64)
    for batch in batches:
        ids = batch.data.view(np.int32)
        blocks, rest = records.pack_array(np.concatenate([rest, ids.astype(np.int64)]), max_len)
        if len(blocks):
            yield records.tfrecord_example_batch(blocks.reshape(-1), np.full(len(blocks), max_len), max_len, pad_id)
    if len(rest):
        yield records.tfrecord_example_batch(rest, np.array([len(rest)]), max_len, pad_id)


#: gzip as ``tf.io.TFRecordWriter(path, "GZIP")`` writes it: zlib's default level, memLevel 9.
GZIP_LEVEL, GZIP_MEM_LEVEL = zlib.Z_DEFAULT_COMPRESSION, 9
#: The gzip header zlib writes (no name, mtime 0, OS Unix): the same bytes on every run.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
#: Uncompressed bytes per independently compressed block (a smaller file is one block).
GZIP_BLOCK = 4 << 20
_WINDOW = 1 << 15
#: Threads compressing the blocks of one file (zlib releases the GIL while it compresses).
GZIP_THREADS = 2


def deflate_block(data: bytes, window: bytes, last: bool) -> bytes:
    """One block of a gzip member's deflate stream: primed with the ``window`` (32 KiB) before it.

    A block ends with a sync flush (byte-aligned, so blocks concatenate into one stream), the
    last with the end of the stream.
    """
    if window:
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, GZIP_MEM_LEVEL, zdict=window)
    else:
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, GZIP_MEM_LEVEL)
    return z.compress(data) + z.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class GzipBlockWriter:
    """Write one gzip member, compressing blocks of :data:`GZIP_BLOCK` bytes on several threads.

    The blocks are cut at fixed offsets of the uncompressed stream and each is primed with the
    32 KiB before it (as pigz does), so the file is the same bytes whatever the threads or the
    sizes written; a file of one block is byte-identical to zlib's (and TensorFlow's) gzip. Any
    gzip reader reads it (``tf.data.TFRecordDataset(..., "GZIP")``, ``gzip``).
    """

    def __init__(self, f: Any, threads: int = GZIP_THREADS):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.f = f
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="gzip")
        self.pending: Any = deque()
        self.limit = 2 * max(1, threads)
        self.parts: list[bytes] = []
        self.buffered = 0
        self.window = b""
        self.crc = 0
        self.size = 0
        f.write(GZIP_HEADER)

    def write(self, data: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.parts.append(data)
        self.buffered += len(data)
        if self.buffered >= GZIP_BLOCK:
            joined = b"".join(self.parts)
            cut = len(joined) - len(joined) % GZIP_BLOCK
            for start in range(0, cut, GZIP_BLOCK):
                self._submit(joined[start : start + GZIP_BLOCK], last=False)
            self.parts, self.buffered = [joined[cut:]], len(joined) - cut

    def _submit(self, block: bytes, last: bool) -> None:
        self.pending.append(self.pool.submit(deflate_block, block, self.window, last))
        self.window = (self.window + block)[-_WINDOW:]
        while len(self.pending) > self.limit:
            self.f.write(self.pending.popleft().result())

    def abort(self) -> None:
        """Stop without finishing the file (an error upstream)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Compress what is left, end the stream and write the gzip trailer (CRC-32, size)."""
        try:
            self._submit(b"".join(self.parts), last=True)
            while self.pending:
                self.f.write(self.pending.popleft().result())
            self.f.write(self.crc.to_bytes(4, "little") + (self.size & 0xFFFFFFFF).to_bytes(4, "little"))
        finally:
            self.pool.shutdown(cancel_futures=True)


def write_tfrecord(path: str, chunks: Iterable[Frames]) -> dict[str, Any]:
    """Write framed TFRecords as a GZIP TFRecord file, without TensorFlow.

    Blocks are compressed on :data:`GZIP_THREADS` threads (:class:`GzipBlockWriter`) while the
    caller merges and frames the next records. Remote paths are written through a local file.

    Args:
        path: the file to write (any Beam filesystem).
        chunks: :data:`Frames` (framed records concatenated, their sizes) in file order
            (:func:`frames_of` makes them of a list of :func:`kogpt2.records.tfrecord_frame` records).

    Returns:
        ``{"examples": count, "sha256": of the serialized examples (the records' data) concatenated}``.
    """
    local = FileSystems.get_scheme(path) in (None, "file")
    target = path
    if not local:
        fd, target = tempfile.mkstemp(suffix=".tfrecord.gz")
        os.close(fd)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    head, tail = records.TFRECORD_HEAD, records.TFRECORD_TAIL
    digest = hashlib.sha256()
    count = 0
    with open(target, "wb") as f:
        gz = GzipBlockWriter(f)
        try:
            for data, sizes in chunks:
                data = data if isinstance(data, bytes) else np.asarray(data, dtype=np.uint8).tobytes()
                gz.write(data)
                # the serialized Examples (self-delimiting), without their framing
                ends = np.cumsum(sizes)
                inner = np.ones(len(data), dtype=bool)
                inner[((ends - sizes)[:, None] + np.arange(head)).reshape(-1)] = False
                inner[((ends - tail)[:, None] + np.arange(tail)).reshape(-1)] = False
                digest.update(np.frombuffer(data, dtype=np.uint8)[inner].tobytes())
                count += len(sizes)
        except BaseException:
            gz.abort()
            raise
        gz.close()
    if not local:
        with open(target, "rb") as src, FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.remove(target)
    return {"examples": count, "sha256": digest.hexdigest()}
