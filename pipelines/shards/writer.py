"""Write each output file from its merged sorted runs: a gzip TFRecord shard, or the rejected-lines JSONL.

:class:`WriteShards` is one task per output file: it merges the file's sorted runs
(:func:`pipelines.shards.spill.merge_runs`), packs token ids into blocks when packing, and
writes the file without TensorFlow: TFRecord framing comes framed from
:func:`pipelines.shards.framing.tfrecord_example_batch`, and gzip is compressed in blocks on
threads (:class:`GzipBlockWriter`), byte-identical to ``tf.io.TFRecordWriter(path, "GZIP")`` for a
file of one block.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from kogpt2.storage import join
from pipelines.shards import framing
from pipelines.shards.runs import RunBatch
from pipelines.shards.spill import merge_runs
from pipelines.shards.textio import REJECTED_FILE, write_rejected


class WrittenFile(NamedTuple):
    """An output file :class:`WriteShards` wrote.

    Attributes:
        name: its file name.
        split: ``train``, ``validation`` or ``rejected``.
        examples: records (or dead letters) in it.
        sha256: of its serialized examples in file order (:func:`kogpt2.records.shard_digest`), or of
            the JSONL file.
    """

    name: str
    split: str
    examples: int
    sha256: str


class WriteShards(beam.DoFn):
    """Merge the sorted runs of one output file and write it (TFRecord shard or rejected JSONL).

    Shard records hold framed TFRecords (:func:`pipelines.shards.framing.tfrecord_example_batch`), or with
    ``packing`` token ids packed into ``max_len`` blocks here; the rejected
    file's hold dead-letter payloads (:mod:`pipelines.shards.textio`). No TensorFlow: the gzip TFRecord
    file is written by :func:`write_tfrecord`.

    Input: ``(file name, [run refs, or None])``; side input: the line counts of every range.
    Output: a :class:`WrittenFile`.
    """

    def __init__(self, output: str, prefix: str, *, packing: bool, max_len: int, pad_id: int):
        self.output = output
        self.prefix = prefix
        self.packing = packing
        self.max_len = max_len
        self.pad_id = pad_id

    def process(
        self, element: tuple[str, Iterable[Any]], line_counts: list[tuple[str, int, int]]
    ) -> Iterator[WrittenFile]:
        name, refs = element
        merged = merge_runs(sorted(r for r in refs if r is not None), self.prefix)
        path = join(self.output, name)
        if name == REJECTED_FILE:
            payloads = (payload for batch in merged for payload in batch.payloads())
            yield WrittenFile(name, "rejected", **write_rejected(path, payloads, line_counts))
            return
        chunks = (
            pack_chunks(merged, self.max_len, self.pad_id)
            if self.packing
            else ((batch.data, batch.sizes) for batch in merged)
        )
        yield WrittenFile(name, name.split("-", 1)[0], **write_tfrecord(path, chunks))


#: Framed TFRecords: their bytes concatenated and each one's size.
Frames = tuple[Any, np.ndarray]


def frames_of(framed: Sequence[bytes]) -> Frames:
    """:data:`Frames` of a list of framed records."""
    return b"".join(framed), np.fromiter(map(len, framed), np.int64, len(framed))


def pack_chunks(batches: Iterable[RunBatch], max_len: int, pad_id: int) -> Iterator[Frames]:
    """Framed TFRecords of ``max_len`` blocks packed from batches of run records holding token ids.

    The same blocks as :func:`kogpt2.records.pack` over the sequences in order: only the last is padded.
    """
    rest = np.zeros(0, dtype=np.int64)
    for batch in batches:
        ids = batch.data.view(np.int32)
        blocks, rest = framing.pack_array(np.concatenate([rest, ids.astype(np.int64)]), max_len)
        if len(blocks):
            yield framing.tfrecord_example_batch(blocks.reshape(-1), np.full(len(blocks), max_len), max_len, pad_id)
    if len(rest):
        yield framing.tfrecord_example_batch(rest, np.array([len(rest)]), max_len, pad_id)


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
            (:func:`frames_of` makes them of a list of :func:`pipelines.shards.framing.tfrecord_frame` records).

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
    head, tail = framing.TFRECORD_HEAD, framing.TFRECORD_TAIL
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
