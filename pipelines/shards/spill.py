"""Sorted runs: each worker spills what it holds as sorted run files; one task per output file merges them.

:class:`SpillRuns` buffers the run records (:mod:`pipelines.shards.runs`) bound for each output
file, sorts them and writes them as a sorted run to a ``_spill-*`` file; :func:`merge_runs`
streams the runs of one output file back in order (:mod:`pipelines.shards.writer` writes the
file). The order is a total order (key, then payload length, then payload), so the merged
records are the same whatever order the runner delivered them in, and a merge holds a bounded
budget of records (:data:`MERGE_BUDGET`) however many runs there are.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from kogpt2.storage import join
from pipelines.shards.runs import (
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
    split_buffer,
)

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
    :class:`~pipelines.shards.runs.FileBatch` (records of several files in one batch). Output:
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
