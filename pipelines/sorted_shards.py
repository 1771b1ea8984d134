"""Deterministic shard writing through sorted runs: spill, merge, write.

Each worker buffers run records per output file, sorts them by key and spills them as
sorted runs to ``_spill-*`` files (:class:`SpillRuns`); one task per output file merges its
runs, streaming, and writes the file (:class:`WriteShards`): a gzip TFRecord shard or the
rejected-lines JSONL. The output is byte-identical whatever order the runner used, and
memory stays flat because records never pass through an in-memory shuffle.

A run record is a 20-byte sort key, a 4-byte big-endian payload length and the payload.
Sorting the raw record bytes sorts by key (ties, equal keys, by length and payload: a total order).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import shutil
import tempfile
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from kogpt2 import records
from pipelines.common import join
from pipelines.run_records import KEY_LEN, record_payload
from pipelines.textio import REJECTED_FILE, write_rejected

SPILL_PREFIX = "_spill-"
#: A sorted run is merged with at most this many others at once (open files per task).
MAX_FANIN = 64
_RECORD_OVERHEAD = 48  # bytes of Python object per buffered record
_CHUNK = 4096  # records joined per write
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


def _chunks(items: Iterable[bytes]) -> Iterator[list[bytes]]:
    """``items`` in lists of up to _CHUNK."""
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _create_run(prefix: str) -> tuple[str, Any]:
    """A new sorted-run file: its path and the open file."""
    path = f"{prefix}{uuid.uuid4().hex}.runs"
    return path, FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _write_records(f: Any, recs: Iterable[bytes]) -> tuple[int, int]:
    """Write run records; return (bytes, records) written."""
    nbytes = count = 0
    for chunk in _chunks(recs):
        data = b"".join(chunk)
        f.write(data)
        nbytes, count = nbytes + len(data), count + len(chunk)
    return nbytes, count


def _read_blocks(ref: RunRef, block: int = 0) -> Iterator[list[bytes]]:
    """The records of one sorted run section ``(path, offset, bytes, records)``, a read block at a time."""
    path, offset, nbytes, _ = ref
    head = KEY_LEN + 4
    block = block or READ_BLOCK
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.seek(offset)
        left = nbytes
        buf = b""
        while left > 0:
            chunk = f.read(min(left, block))
            if not chunk:
                raise OSError(f"{path}: sorted run ends {left} bytes early")
            left -= len(chunk)
            buf += chunk
            pos, n = 0, len(buf)
            recs = []
            while pos + head <= n:
                end = pos + head + int.from_bytes(buf[pos + KEY_LEN : pos + head], "big")
                if end > n:
                    break
                recs.append(buf[pos:end])
                pos = end
            if recs:
                yield recs
            buf = buf[pos:]
        if buf:
            raise OSError(f"{path}: truncated record at the end of a sorted run")


def _read_records(ref: RunRef, block: int = 0) -> Iterator[bytes]:
    """Stream the records of one sorted run section ``(path, offset, bytes, records)``."""
    for recs in _read_blocks(ref, block):
        yield from recs


def merge_read_block(runs: int) -> int:
    """The read block per run of a merge of ``runs`` runs: :data:`MERGE_BUDGET` shared out.

    At most :data:`READ_BLOCK`, at least :data:`MIN_READ_BLOCK`.
    """
    return max(MIN_READ_BLOCK, min(READ_BLOCK, MERGE_BUDGET // max(1, runs)))


def merge_blocks(refs: Sequence[RunRef]) -> Iterator[list[bytes]]:
    """The records of sorted run sections, merged in order, in lists.

    A block at a time from each run: every record up to the smallest of the blocks' last records
    is taken from each and sorted together (``list.sort`` merges sorted sequences in C), so no
    Python code runs per record. The blocks share :data:`MERGE_BUDGET` (:func:`merge_read_block`),
    so the records held, and each list yielded, stay bounded however many runs are merged.
    """
    block = merge_read_block(len(refs))
    active: list[tuple[list[bytes], int, Iterator[list[bytes]]]] = []
    for ref in refs:
        blocks = _read_blocks(ref, block)
        first = next(blocks, None)
        if first:
            active.append((first, 0, blocks))
    while active:
        if len(active) == 1:
            recs, i, blocks = active[0]
            yield recs[i:] if i else recs
            yield from blocks
            return
        bound = min(recs[-1] for recs, _, _ in active)
        out: list[bytes] = []
        refill = []
        for recs, i, blocks in active:
            j = bisect.bisect_right(recs, bound, i)
            out.extend(recs[i:j])
            if j < len(recs):
                refill.append((recs, j, blocks))
            else:
                following = next(blocks, None)
                if following:
                    refill.append((following, 0, blocks))
        active = refill
        out.sort()
        yield out


def _merge(refs: Sequence[RunRef]) -> Iterator[bytes]:
    for recs in merge_blocks(refs):
        yield from recs


def _reduce_runs(refs: Sequence[RunRef], prefix: str) -> list[RunRef]:
    """More than MAX_FANIN runs first merged in groups into new runs under ``prefix`` (bounded open files)."""
    refs = list(refs)
    while len(refs) > MAX_FANIN:
        merged = []
        for i in range(0, len(refs), MAX_FANIN):
            path, f = _create_run(prefix)
            with f:
                nbytes, count = _write_records(f, _merge(refs[i : i + MAX_FANIN]))
            merged.append((path, 0, nbytes, count))
        refs = merged
    return refs


def merge_runs(refs: Sequence[RunRef], prefix: str) -> Iterator[bytes]:
    """The records of sorted runs, merged in order (more than MAX_FANIN runs in rounds)."""
    return _merge(_reduce_runs(refs, prefix))


# --- DoFns -----------------------------------------------------------------------------


class SpillRuns(beam.DoFn):
    """Buffer run records per output file, sort them and write them as sorted runs.

    Input: ``{output file name: [run records]}``. Output: ``(output file name, (run path, offset, bytes, records))`` per run section.
    """

    def __init__(self, prefix: str, buffer_bytes: int):
        self.prefix = prefix
        self.buffer_bytes = buffer_bytes

    def start_bundle(self) -> None:
        self.buffer: dict[str, list[bytes]] = defaultdict(list)
        self.size = 0

    def process(self, items: dict[str, list[bytes]]) -> Iterator[tuple[str, RunRef]]:
        for name, recs in items.items():
            self.buffer[name].extend(recs)
            self.size += sum(map(len, recs)) + _RECORD_OVERHEAD * len(recs)
        if self.size >= self.buffer_bytes:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        for out in self._flush():
            yield GlobalWindows.windowed_value(out)

    def _flush(self) -> Iterator[tuple[str, RunRef]]:
        if not self.buffer:
            return
        path, f = _create_run(self.prefix)
        offset = 0
        sections = []
        with f:
            for name in sorted(self.buffer):
                recs = self.buffer[name]
                recs.sort()
                nbytes, count = _write_records(f, recs)
                sections.append((name, (path, offset, nbytes, count)))
                offset += nbytes
        self.buffer = defaultdict(list)
        self.size = 0
        yield from sections


class WriteShards(beam.DoFn):
    """Merge the sorted runs of one output file and write it (TFRecord shard or rejected JSONL).

    Shard records hold framed TFRecords (:func:`kogpt2.records.tfrecord_frames`), or with
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
        runs = _reduce_runs(sorted(r for r in refs if r is not None), self.prefix)
        path = join(self.output, name)
        if name == REJECTED_FILE:
            yield {
                "name": name,
                "split": "rejected",
                **write_rejected(path, map(record_payload, _merge(runs)), line_counts),
            }
            return
        head = KEY_LEN + 4
        merged = merge_blocks(runs)
        chunks = (
            pack_chunks(merged, self.max_len, self.pad_id)
            if self.packing
            else ([rec[head:] for rec in recs] for recs in merged)
        )
        yield {"name": name, "split": name.split("-", 1)[0], **write_tfrecord(path, chunks)}


def pack_chunks(chunks: Iterable[list[bytes]], max_len: int, pad_id: int) -> Iterator[list[bytes]]:
    """Framed TFRecords of ``max_len`` blocks packed from chunks of run records holding token ids.

    The same blocks as :func:`kogpt2.records.pack` over the sequences in order: only the last is padded.
    """
    rest = np.zeros(0, dtype=np.int64)
    head = KEY_LEN + 4
    for chunk in chunks:
        ids = np.frombuffer(b"".join([rec[head:] for rec in chunk]), dtype=np.int32)
        blocks, rest = records.pack_array(np.concatenate([rest, ids.astype(np.int64)]), max_len)
        if len(blocks):
            yield records.tfrecord_examples(blocks.reshape(-1), np.full(len(blocks), max_len), max_len, pad_id)
    if len(rest):
        yield records.tfrecord_examples(rest, np.array([len(rest)]), max_len, pad_id)


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


def write_tfrecord(path: str, chunks: Iterable[Sequence[bytes]]) -> dict[str, Any]:
    """Write framed TFRecords as a GZIP TFRecord file, without TensorFlow.

    Blocks are compressed on :data:`GZIP_THREADS` threads (:class:`GzipBlockWriter`) while the
    caller merges and frames the next records. Remote paths are written through a local file.

    Args:
        path: the file to write (any Beam filesystem).
        chunks: lists of :func:`kogpt2.records.tfrecord_frame` records, in file order.

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
            for chunk in chunks:
                gz.write(b"".join(chunk))
                digest.update(b"".join([rec[head:-tail] for rec in chunk]))  # serialized Examples are self-delimiting
                count += len(chunk)
        except BaseException:
            gz.abort()
            raise
        gz.close()
    if not local:
        with open(target, "rb") as src, FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.remove(target)
    return {"examples": count, "sha256": digest.hexdigest()}
