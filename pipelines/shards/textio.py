"""Reading raw text files as lines of bytes, and the dead letters of lines and files.

Files are matched when a run starts (:func:`pipelines.common.match_globs`), cut into byte ranges
(:func:`plan_ranges`) and read in parallel by :class:`ReadLines`, which remembers file, range
and line index. Lines end at ``\n``, ``\r\n`` or a lone ``\r`` (:func:`iter_lines`), and a
line longer than ``--max-line-bytes`` is never held whole: it becomes a ``too_long`` dead letter
keeping only a short prefix. A compressed file that is truncated or corrupt (:func:`open_input`
reads ``.gz``, ``.bz2``, ``.xz``/``.lzma`` with Python's own decompressors, which notice a missing
end-of-stream marker) keeps the lines read before the damage and becomes one ``corrupt_input``
dead letter for the file. A line that does not decode becomes an ``undecodable`` dead letter
(:func:`rejected_entry`). All are written to ``rejected-*.jsonl`` with their line numbers
resolved (:func:`write_rejected`).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import re
import struct
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any, NamedTuple, cast

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from kogpt2 import text as textlib
from pipelines.counters import Count, Counters
from pipelines.shards.runs import run_record

REJECTED_FILE = "rejected-00000-of-00001.jsonl"
#: Default byte limit of one line, terminator excluded (``--max-line-bytes``).
MAX_LINE_BYTES = 1 << 20
#: Bytes of a too-long line kept in its dead letter.
PREFIX_BYTES = 64
#: The line index of a file-level dead letter: it sorts after every line of its file.
FILE_LEVEL = (1 << 64) - 1
_READ_CHUNK = 1 << 16
#: Lines of one block of a compressed file read in interleaved parts (:func:`plan_ranges`).
PART_LINES = 1 << 14
_EOL = re.compile(rb"[\r\n]")
#: Compressed inputs read with Python's decompressors, which raise on a truncated or corrupt stream.
_CHECKED = {
    CompressionTypes.GZIP: lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    CompressionTypes.BZIP2: lambda raw: bz2.BZ2File(raw, mode="rb"),
    CompressionTypes.LZMA: lambda raw: lzma.LZMAFile(raw, mode="rb"),
}
_CORRUPT_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


def plan_ranges(
    path: str,
    size: int,
    *,
    parts: int = 16,
    min_bytes: int = 1 << 20,
    max_bytes: int = 64 << 20,
    compressed_parts: int = 1,
) -> list[tuple[str, int, int]]:
    """Cut a file into byte ranges ``(path, start, end)`` read in parallel.

    A line belongs to the range it starts in. A compressed file (by extension) cannot be cut
    into byte ranges: it is read in ``compressed_parts`` interleaved parts ``(path, part, -compressed_parts)``,
    each decompressing the whole file and keeping every ``compressed_parts``-th block of
    :data:`PART_LINES` lines (decompressing is a small share of the work; cleaning and encoding
    the lines is then shared). With one part that is ``(path, 0, -1)``. Ranges depend only on
    the size and the part count, and the lines are the same whatever the part count.
    """
    if CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        k = max(1, compressed_parts)
        return [(path, part, -k) for part in range(k)]
    step = min(max_bytes, max(min_bytes, -(-size // parts)))
    return [(path, start, min(start + step, size)) for start in range(0, size, step)]


def iter_lines(f: IO[bytes], max_bytes: int, chunk: int = _READ_CHUNK) -> Iterator[tuple[int, bytes, int]]:
    """Split a binary stream into lines ending at ``\n``, ``\r\n`` or a lone ``\r``.

    Memory stays within ``max_bytes`` plus one chunk whatever the line lengths.

    Args:
        f: the stream, positioned where the first line starts.
        max_bytes: longest line (terminator excluded) returned whole.
        chunk: bytes per read.

    Yields:
        ``(consumed, line, length)``: bytes consumed including the terminator, the line without
        it, and its length. When ``length > max_bytes`` the line holds only its first
        :data:`PREFIX_BYTES` bytes. A last line without a terminator is yielded too.
    """
    parts: list[bytes] = []
    kept = length = 0
    cap = max(max_bytes + 1, PREFIX_BYTES)  # bytes of a line ever held
    # read1: one underlying read at a time, so a decompression error loses only its own block
    read = getattr(f, "read1", f.read)
    while True:
        buf = read(chunk)
        if not buf:
            break
        while buf.endswith(b"\r"):  # a \r\n pair may straddle two reads
            more = f.read(1)
            if not more:
                break
            buf += more
        pos, n = 0, len(buf)
        while pos < n:
            m = _EOL.search(buf, pos)
            stop = n if m is None else m.start()
            if stop > pos:
                length += stop - pos
                if kept < cap:
                    parts.append(buf[pos : min(stop, pos + cap - kept)])
                    kept += len(parts[-1])
            if m is None:
                break
            term = 2 if buf[stop : stop + 2] == b"\r\n" else 1
            line = b"".join(parts)
            yield length + term, line if length <= max_bytes else line[:PREFIX_BYTES], length
            parts, kept, length = [], 0, 0
            pos = stop + term
    if parts:
        line = b"".join(parts)
        yield length, line if length <= max_bytes else line[:PREFIX_BYTES], length


def read_chunks(f: IO[bytes], chunk: int = _READ_CHUNK) -> Iterator[bytes]:
    """The bytes of a stream, one underlying read at a time (``read1``: a decompression error loses only its block)."""
    read = getattr(f, "read1", f.read)
    while True:
        buf = read(chunk)
        if not buf:
            return
        yield buf


def range_chunks(f: IO[bytes], pos: int, end: int, chunk: int = _READ_CHUNK) -> Iterator[bytes]:
    """The bytes of the lines that start in ``[pos, end)``: up to ``end``, then the rest of the line over it.

    ``f`` is positioned at ``pos``, a line start (:func:`skip_to_line_start`).
    """
    left = end - pos
    last = b""
    while left > 0:
        buf = f.read(min(chunk, left))
        if not buf:
            return
        left -= len(buf)
        last = buf[-1:]
        yield buf
    if not last or last == b"\n":
        return
    if last == b"\r":  # a line end, perhaps the first half of \r\n
        if f.read(1) == b"\n":
            yield b"\n"
        return
    while True:  # the line running over ``end`` belongs to this range
        buf = f.read(chunk)
        if not buf:
            return
        m = _EOL.search(buf)
        if m is None:
            yield buf
            continue
        stop = m.end()
        if buf[m.start()] == 0x0D:
            if stop == len(buf):
                yield buf
                if f.read(1) == b"\n":
                    yield b"\n"
                return
            if buf[stop] == 0x0A:
                stop += 1
        yield buf[:stop]
        return


def iter_line_blocks(chunks: Iterable[bytes], max_bytes: int) -> Iterator[tuple[list[bytes], dict[int, int]]]:
    """Split a stream of byte chunks into lines ending at ``\n``, ``\r\n`` or a lone ``\r``, a block at a time.

    The same lines as :func:`iter_lines`, split with ``bytes.splitlines`` (whose line ends are exactly
    these three) a chunk at a time; memory stays within ``max_bytes`` plus one chunk.

    Yields:
        ``(lines, too_long)`` per chunk holding a line end (and once at the end for a last line
        without one): the lines, and ``{index in lines: length}`` of the lines over ``max_bytes``,
        which hold only their first :data:`PREFIX_BYTES` bytes.
    """
    carry: list[bytes] = []  # the start of the current line (at most ``cap`` bytes of it)
    kept = length = 0
    cap = max(max_bytes + 1, PREFIX_BYTES)
    after_cr = False
    for chunk in chunks:
        if after_cr and chunk[:1] == b"\n":  # the second half of a \r\n split between chunks
            chunk = chunk[1:]
        after_cr = False
        last = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if last < 0:  # no line end: all of it continues the current line
            length += len(chunk)
            if kept < cap and chunk:
                carry.append(chunk[: cap - kept])
                kept += len(carry[-1])
            continue
        after_cr = last == len(chunk) - 1 and chunk[last] == 0x0D
        head, tail = chunk[: last + 1], chunk[last + 1 :]
        first_length = -1
        if length:  # the first line of the chunk ends the carried one
            m = _EOL.search(head)
            assert m is not None
            stop = m.start()
            length += stop
            if kept < cap:
                carry.append(head[: min(stop, cap - kept)])
            first_length = length
            lines = [b"".join(carry), *head[stop + (2 if head[stop : stop + 2] == b"\r\n" else 1) :].splitlines()]
        else:
            lines = head.splitlines()
        too_long: dict[int, int] = {}
        if first_length > max_bytes:
            too_long[0] = first_length
        if max(map(len, lines)) > max_bytes:
            too_long.update(
                (i, len(line)) for i, line in enumerate(lines) if len(line) > max_bytes and i not in too_long
            )
        for i in too_long:
            lines[i] = lines[i][:PREFIX_BYTES]
        yield lines, too_long
        length = len(tail)
        carry = [tail[:cap]] if tail else []
        kept = len(carry[0]) if carry else 0
    if length:
        line = b"".join(carry)
        yield ([line[:PREFIX_BYTES]], {0: length}) if length > max_bytes else ([line], {})


def skip_to_line_start(f: IO[bytes], start: int) -> int:
    """Position a seekable stream at the first line that starts at or after byte ``start``.

    The line running into ``start`` belongs to the range before; a ``\r\n`` split by ``start``
    ends that line. Returns the position of the first line start.
    """
    if start == 0:
        f.seek(0)
        return 0
    f.seek(start - 1)
    before = f.read(2)
    if before[:1] == b"\n" or (before[:1] == b"\r" and before[1:2] != b"\n"):
        f.seek(start)
        return start
    if before == b"\r\n":
        f.seek(start + 1)
        return start + 1
    f.seek(start)
    pos = start
    for consumed, _, _ in iter_lines(f, 0):  # the partial line, held as a prefix at most
        pos += consumed
        break
    f.seek(pos)
    return pos


class _SourceWatch(io.RawIOBase):
    """A raw stream that remembers whether reading the underlying file failed (I/O, not data)."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.failed = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self.raw.read(len(b))
        except Exception:
            self.failed = True
            raise
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_input(path: str, whole: bool) -> tuple[IO[bytes], _SourceWatch | None]:
    """Open an input file as bytes: a byte range of a plain file, or a whole (decompressed) file.

    Returns:
        ``(stream, watch)``: ``watch`` is set for files decompressed by Python's gzip, bz2 or
        lzma, whose errors (truncated stream, bad data) mean a corrupt input unless
        ``watch.failed`` says the underlying read itself failed.
    """
    if not whole:
        return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED), None
    kind = CompressionTypes.detect_compression_type(path)
    if kind not in _CHECKED:
        return FileSystems.open(path, compression_type=CompressionTypes.AUTO), None
    watch = _SourceWatch(FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED))
    return cast(IO[bytes], _CHECKED[kind](io.BufferedReader(watch, 1 << 16))), watch


class LineBatch(NamedTuple):
    """Lines read from one file: what :class:`ReadLines` hands to cleaning.

    Attributes:
        path: the file.
        start: the byte offset where its range starts (0 for a whole file).
        first: the index of the batch's first line within its range.
        lines: raw lines, terminators removed (over-long ones cut to a prefix).
    """

    path: str
    start: int
    first: int
    lines: list[bytes]


class ReadLines(beam.DoFn):
    """Read a byte range of a file (or a part of a compressed file) as lines of bytes, in batches.

    Main output: ``(path, segment_start, first_index, [line bytes...])`` (line endings removed).
    A segment is a byte range of a plain file (``segment_start`` its first byte), or a block of
    :data:`PART_LINES` lines of a compressed file (``segment_start`` its first line number); line
    ``first_index + k`` of a segment is numbered by the segments before it (:func:`write_rejected`).
    ``line_counts`` output: ``(path, segment_start, lines in the segment)``: every line, too-long
    ones included. ``rejected`` output: ``{rejected file name: [run records]}`` of too-long lines
    and corrupt files. ``stats`` output: :class:`~pipelines.counters.StepCounts`.
    """

    LINE_COUNTS = "line_counts"
    REJECTED = "rejected"
    STATS = "stats"

    def __init__(self, batch_size: int, files: Sequence[str] = (), max_line_bytes: int = MAX_LINE_BYTES):
        self.batch_size = batch_size
        self.file_index = {path: i for i, path in enumerate(files)}
        self.max_line_bytes = max_line_bytes

    def setup(self) -> None:
        self.counters = Counters()

    def process(self, rng: tuple[str, int, int]) -> Iterator[Any]:
        path, start, end = rng
        whole = end < 0
        part, parts = (start, -end) if whole else (0, 1)
        file_index = self.file_index.get(path, len(self.file_index))
        limit, size = self.max_line_bytes, self.batch_size
        n = too_long = 0  # lines of the range (of the whole file when ``whole``), those over the limit
        segments: dict[int, int] = {}  # segment start -> lines read in it (this reader's segments)
        rejected: list[bytes] = []
        corrupt: tuple[str, ...] = ()  # this file, if it is corrupt
        batch: list[bytes] = []
        seg = first = 0  # the pending batch: its segment and the index of its first line there
        f, watch = open_input(path, whole=whole)
        try:
            if whole:
                chunks = read_chunks(f)
            else:
                pos = skip_to_line_start(f, start)
                chunks = range_chunks(f, pos, end)
            for lines, long in iter_line_blocks(chunks, limit):
                i = 0
                while i < len(lines):
                    if whole:
                        block = n // PART_LINES
                        take = min(len(lines) - i, (block + 1) * PART_LINES - n)
                        owned, seg_start, index = block % parts == part, block * PART_LINES, n % PART_LINES
                    else:
                        take, owned, seg_start, index = len(lines) - i, True, start, n
                    if owned:
                        segments[seg_start] = segments.get(seg_start, 0) + take
                        if batch and seg_start != seg:
                            yield LineBatch(path, seg, first, batch)
                            batch = []
                        if not batch:
                            seg, first = seg_start, index
                        rows = lines[i : i + take]
                        bad = sorted(k - i for k in long if i <= k < i + take) if long else []
                        if bad:  # a too-long line splits the batch around it
                            done = 0
                            for k in bad:
                                batch.extend(rows[done:k])
                                if batch:
                                    yield LineBatch(path, seg, first, batch)
                                    batch = []
                                entry = too_long_entry(
                                    file_index, path, seg_start, index + k, rows[k], long[i + k], limit
                                )
                                rejected.append(run_record(*entry))
                                too_long += 1
                                done, first = k + 1, index + k + 1
                            batch.extend(rows[done:])
                        else:
                            batch.extend(rows)
                        while len(batch) >= size:
                            yield LineBatch(path, seg, first, batch[:size])
                            batch, first = batch[size:], first + size
                    n += take
                    i += take
        except _CORRUPT_ERRORS as exc:
            if watch is None or watch.failed:
                raise
            if part == 0:
                detail = (
                    f"{type(exc).__name__}: {exc}; the {n} lines read before it are kept, the rest of the file is lost"
                )
                rejected.append(run_record(*file_entry(file_index, path, "corrupt_input", detail)))
                corrupt = (path,)
        finally:
            f.close()
        if batch:
            yield LineBatch(path, seg, first, batch)
        counts = {
            Count.LINES_READ: sum(segments.values()),
            Count.REJECTED: too_long,
            Count.REJECTED_TOO_LONG: too_long,
            Count.CORRUPT_INPUTS: len(corrupt),
        }
        if rejected:
            yield beam.pvalue.TaggedOutput(self.REJECTED, {REJECTED_FILE: rejected})
        yield beam.pvalue.TaggedOutput(self.STATS, self.counters.report(counts, corrupt))
        if not whole:
            segments = {start: n}
        for seg_start, count in sorted(segments.items()):
            yield beam.pvalue.TaggedOutput(self.LINE_COUNTS, (path, seg_start, count))


def _entry(file_index: int, path: str, start: int, index: int, payload: dict[str, Any]) -> tuple[bytes, bytes]:
    """A dead letter: ``(sort key, JSON payload)``; the 20-byte key sorts by file, range and line."""
    key = struct.pack(">IQQ", file_index, start, index)
    record = {"file": path, "start": start, "index": index, **payload}
    return key, json.dumps(record, ensure_ascii=False).encode("utf-8")


def rejected_entry(
    file_index: int, path: str, start: int, index: int, exc: UnicodeDecodeError, raw: bytes
) -> tuple[bytes, bytes]:
    """A line that does not decode: reason ``undecodable``, the codec's message as ``detail``.

    The line number is resolved when :func:`write_rejected` writes it.
    """
    payload = {"reason": "undecodable", "detail": str(exc), "raw": textlib.escape_bytes(raw)}
    return _entry(file_index, path, start, index, payload)


def too_long_entry(
    file_index: int, path: str, start: int, index: int, prefix: bytes, length: int, limit: int
) -> tuple[bytes, bytes]:
    """A line over the byte limit: reason ``too_long``; ``raw`` holds only its first bytes."""
    detail = f"{length} bytes, over --max-line-bytes {limit}; raw holds the first {len(prefix)} bytes"
    payload = {"reason": "too_long", "detail": detail, "raw": textlib.escape_bytes(prefix[:PREFIX_BYTES])}
    return _entry(file_index, path, start, index, payload)


def file_entry(file_index: int, path: str, reason: str, detail: str) -> tuple[bytes, bytes]:
    """A dead letter for a whole file (``line`` is null), sorted after the file's lines."""
    return _entry(file_index, path, 0, FILE_LEVEL, {"reason": reason, "detail": detail, "raw": ""})


def write_rejected(path: str, payloads: Iterable[bytes], line_counts: Iterable[tuple[str, int, int]]) -> dict[str, Any]:
    """Write dead-letter payloads (in key order) as JSONL ``{"file", "line", "reason", "detail", "raw"}``.

    ``line`` is 1-based, or null for a record about a whole file (``corrupt_input``).

    Args:
        path: the JSONL file to write.
        payloads: :func:`rejected_entry` payloads, sorted by their keys.
        line_counts: ``(path, range_start, lines)`` of every range read, to number the lines.

    Returns:
        ``{"examples": lines written, "sha256": of the file}``.
    """
    before: dict[tuple[str, int], int] = {}
    by_file: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for file, start, n in line_counts:
        by_file[file].append((start, n))
    for file, ranges in by_file.items():
        total = 0
        for start, n in sorted(ranges):
            before[(file, start)] = total
            total += n
    count = 0
    digest = hashlib.sha256()
    with FileSystems.create(path, mime_type="application/json", compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for payload in payloads:
            rec = json.loads(payload)
            line = None if rec["index"] == FILE_LEVEL else before[(rec["file"], rec["start"])] + rec["index"] + 1
            out = {
                "file": rec["file"],
                "line": line,
                "reason": rec["reason"],
                "detail": rec["detail"],
                "raw": rec["raw"],
            }
            data = (json.dumps(out, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            f.write(data)
            digest.update(data)
            count += 1
    return {"examples": count, "sha256": digest.hexdigest()}
