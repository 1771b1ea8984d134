"""Reading raw text files as lines of bytes, and the record of lines that do not decode.

Files are matched when a run starts (:func:`match_files`), cut into byte ranges
(:func:`plan_ranges`) and read in parallel by :class:`ReadLines`, which remembers file, range
and line index. A line that does not decode becomes a rejected-line entry
(:func:`rejected_entry`), written to ``rejected-*.jsonl`` with its line number resolved
(:func:`write_rejected`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from kogpt2 import text as textlib
from pipelines.counters import Counters

REJECTED_FILE = "rejected-00000-of-00001.jsonl"


def match_files(patterns: Sequence[str]) -> dict[str, int]:
    """The files (any Beam filesystem) the globs match, with their sizes in bytes.

    Raises:
        FileNotFoundError: a glob matches no file.
    """
    files: dict[str, int] = {}
    for pattern in patterns:
        matched = [m for m in FileSystems.match([pattern])[0].metadata_list if not m.path.endswith("/")]
        if not matched:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.update((m.path, m.size_in_bytes) for m in matched)
    return files


def plan_ranges(
    path: str, size: int, *, parts: int = 16, min_bytes: int = 1 << 20, max_bytes: int = 64 << 20
) -> list[tuple[str, int, int]]:
    """Cut a file into byte ranges ``(path, start, end)`` read in parallel.

    A line belongs to the range it starts in. Compressed files (by extension) are one range
    with ``end = -1`` (read to the end). Ranges depend only on the size: deterministic.
    """
    if CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        return [(path, 0, -1)]
    step = min(max_bytes, max(min_bytes, -(-size // parts)))
    return [(path, start, min(start + step, size)) for start in range(0, size, step)]


class ReadLines(beam.DoFn):
    """Read a byte range of a file as lines of bytes, in batches.

    Main output: ``(path, range_start, first_index, [line bytes...])`` (line endings removed).
    ``line_counts`` output: ``(path, range_start, lines in the range)``.
    """

    LINE_COUNTS = "line_counts"

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def setup(self) -> None:
        self.counters = Counters()

    def process(self, rng: tuple[str, int, int]) -> Iterator[Any]:
        path, start, end = rng
        compression = CompressionTypes.UNCOMPRESSED if end >= 0 else CompressionTypes.AUTO
        n = first = 0
        batch: list[bytes] = []
        with FileSystems.open(path, compression_type=compression) as f:
            pos = start
            if start > 0:
                f.seek(start - 1)
                pos = start - 1 + len(f.readline())  # the line running into this range is the previous range's
            while end < 0 or pos < end:
                line = f.readline()
                if not line:
                    break
                pos += len(line)
                if line.endswith(b"\n"):
                    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                batch.append(line)
                n += 1
                if len(batch) >= self.batch_size:
                    yield path, start, first, batch
                    first, batch = n, []
        if batch:
            yield path, start, first, batch
        self.counters.add({"lines_read": n})
        yield beam.pvalue.TaggedOutput(self.LINE_COUNTS, (path, start, n))


def rejected_entry(
    file_index: int, path: str, start: int, index: int, exc: UnicodeDecodeError, raw: bytes
) -> tuple[bytes, bytes]:
    """A line that does not decode: ``(sort key, JSON payload)``.

    The 20-byte key sorts by file, range and line; the line number is resolved when
    :func:`write_rejected` writes it.
    """
    key = struct.pack(">IQQ", file_index, start, index)
    payload = {"file": path, "start": start, "index": index, "reason": str(exc), "raw": textlib.escape_bytes(raw)}
    return key, json.dumps(payload, ensure_ascii=False).encode("utf-8")


def write_rejected(path: str, payloads: Iterable[bytes], line_counts: Iterable[tuple[str, int, int]]) -> dict[str, Any]:
    """Write rejected-line payloads (in key order) as JSONL ``{"file", "line", "reason", "raw"}``.

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
            line = before[(rec["file"], rec["start"])] + rec["index"] + 1
            out = {"file": rec["file"], "line": line, "reason": rec["reason"], "raw": rec["raw"]}
            data = (json.dumps(out, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            f.write(data)
            digest.update(data)
            count += 1
    return {"examples": count, "sha256": digest.hexdigest()}
