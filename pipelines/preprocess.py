"""Corpus preprocessing: raw Korean text files -> gzip TFRecord shards + ``info.json``.

``python -m pipelines.preprocess --input GLOB --tokenizer PATH --output DIR [options] [Beam options]``

Steps (each a labelled Beam transform):

1. The input globs are matched when the command starts (any Beam filesystem, ``gs://`` too: an
   empty glob fails before anything is written); ``MatchFiles`` / ``ReadMatches`` the files, cut
   each into byte ranges (``PlanRanges``; gzip/bzip2 files are one range) and ``ReadLines`` them
   as bytes, remembering file, range and line index.
2. ``Clean``: decode (undecodable lines go to ``rejected-*.jsonl``), normalize, optionally
   split sentences, filter; optionally ``Dedup`` exact duplicates.
3. ``Tokenize`` (tokenizer loaded in ``setup``): ``<s>`` + ids + ``</s>``.
4. ``MakeExamples``: split by a hash of the normalized text, pick the shard by the same hash,
   fit to ``max_len`` (the front is kept) and serialize; with ``--packing`` sentences stay
   whole until ``WriteShards`` packs them.
5. ``SpillSortedRuns`` / ``WriteShards``: each worker sorts what it holds by key and spills
   sorted runs to ``_spill-*`` files; one task per shard merges its runs (streaming) and
   writes the shard. Shards are byte-identical on rerun, whatever the runner's order, and
   memory stays flat because examples never pass through an in-memory shuffle.
6. ``WriteInfo``: ``info.json`` (checked against ``schemas/shard_info.json``), the spill files
   are removed, and ``COMPLETED`` is written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import heapq
import json
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
import uuid
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindows

import kogpt2
from kogpt2 import records
from kogpt2 import text as textlib
from kogpt2.schemas import validate_info
from kogpt2.tokenizer import Tokenizer, load_tokenizer
from pipelines.common import (
    OutputConflictError,
    create_pipeline,
    is_completed,
    join,
    mark_completed,
    pipeline_options,
    prepare_output,
    read_text,
    write_json,
)

NAMESPACE = "kogpt2.preprocess"
INFO_FILE = "info.json"
REJECTED_FILE = "rejected-00000-of-00001.jsonl"
SPILL_PREFIX = "_spill-"
#: Auto sharding: one train shard per this many input bytes (at most MAX_AUTO_SHARDS).
AUTO_SHARD_BYTES = 128 << 20
MAX_AUTO_SHARDS = 1000
#: A sorted run is merged with at most this many others at once (open files per task).
MAX_FANIN = 64
#: Sorted-run records: a 20-byte sort key, a 4-byte big-endian payload length, the payload.
#: Sorting the raw record bytes sorts by key (ties, equal keys, by length and payload: a total order).
KEY_LEN = 20
_RECORD_OVERHEAD = 48  # bytes of Python object per buffered record
FINGERPRINT_METHOD = (
    "sha256 over the lines 'shard name<TAB>sha256 of its records' of every train/validation shard, "
    "sorted by name; a shard's sha256 runs over its serialized tf.train.Example records concatenated "
    "in file order (self-delimiting protos; independent of gzip and TFRecord framing)"
)


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    """What defines a preprocessing run. Validated on creation; errors name the field.

    Attributes:
        inputs: file globs (any Beam filesystem).
        tokenizer: tokenizer file or model folder (a ``gs://`` file on Dataflow).
        output: output folder.
        max_len: tokens per example, ``<s>`` and ``</s>`` included (at least 3).
        val_fraction: share of texts in the validation split, in [0, 1).
        packing: concatenate sentences into full blocks instead of padding each.
        overflow: a sentence longer than ``max_len`` is cut at the end (``truncate``) or into
            ``window`` pieces. Ignored with ``packing``, where sentences run across blocks.
        encoding: text encoding of the inputs (``utf-8``, ``cp949``, ``euc-kr``, ...).
        split_sentences: lines are paragraphs: split them into sentences.
        min_chars: shortest normalized text kept, in characters.
        dedup: drop exact duplicates of normalized texts (sentences with ``split_sentences``).
        num_shards: train shards; 0 chooses one per 128 MiB of input.
        overwrite: replace whatever the output folder holds.
        batch_size: lines per element between steps (tuning).
        spill_mb: memory a worker sorts in before it spills a run to disk (tuning).
    """

    inputs: tuple[str, ...]
    tokenizer: str
    output: str
    max_len: int = 30
    val_fraction: float = 0.1
    packing: bool = False
    overflow: str = "truncate"
    encoding: str = "utf-8"
    split_sentences: bool = False
    min_chars: int = 1
    dedup: bool = False
    num_shards: int = 0
    overwrite: bool = False
    batch_size: int = 512
    spill_mb: float = 32.0

    def __post_init__(self) -> None:
        inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        object.__setattr__(self, "inputs", inputs)
        if not inputs or not all(isinstance(g, str) and g for g in inputs):
            raise ValueError(f"inputs={inputs!r}: give at least one non-empty file glob")
        for name in ("tokenizer", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r}: required")
        _check_int("max_len", self.max_len, 3, "at least 3 (<s> + one token + </s>)")
        if isinstance(self.val_fraction, bool) or not (0.0 <= float(self.val_fraction) < 1.0):
            raise ValueError(f"val_fraction={self.val_fraction!r}: must be in [0, 1)")
        if self.overflow not in records.OVERFLOW_MODES:
            raise ValueError(f"overflow={self.overflow!r}: must be one of {records.OVERFLOW_MODES}")
        object.__setattr__(self, "encoding", textlib.check_encoding(self.encoding))
        _check_int("min_chars", self.min_chars, 0, "a non-negative number of characters")
        _check_int("num_shards", self.num_shards, 0, "0 (auto) or a positive number of shards")
        _check_int("batch_size", self.batch_size, 1, "a positive number of lines")
        if isinstance(self.spill_mb, bool) or not isinstance(self.spill_mb, (int, float)) or not self.spill_mb > 0:
            raise ValueError(f"spill_mb={self.spill_mb!r}: must be a positive number of MiB")


def _check_int(name: str, value: Any, minimum: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be {allowed}")


@dataclass(frozen=True)
class Plan:
    """What a run resolves before it starts: matched files, tokenizer facts, shard names."""

    files: tuple[str, ...]
    input_bytes: int
    tokenizer: dict[str, Any]
    shard_names: dict[str, tuple[str, ...]]
    run_id: str

    @property
    def all_names(self) -> list[str]:
        return [*self.shard_names["train"], *self.shard_names["validation"], REJECTED_FILE]


def open_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a local path, or copy a remote file (``gs://...``) locally first."""
    if FileSystems.get_scheme(path) in (None, "file"):
        return load_tokenizer(path)
    local = os.path.join(tempfile.mkdtemp(prefix="kogpt2-tok-"), path.rstrip("/").rsplit("/", 1)[-1])
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return load_tokenizer(local)


def shard_counts(config: PreprocessConfig, input_bytes: int) -> dict[str, int]:
    """Train shards (``num_shards`` or one per 128 MiB of input) and validation shards in proportion."""
    train = config.num_shards or max(1, min(MAX_AUTO_SHARDS, math.ceil(input_bytes / AUTO_SHARD_BYTES)))
    vf = float(config.val_fraction)
    val = 0 if vf == 0 else max(1, math.ceil(round(train * vf / (1 - vf), 6)))
    return {"train": train, "validation": val}


def make_plan(config: PreprocessConfig) -> Plan:
    """Match the inputs and read the tokenizer, before anything is written.

    Raises:
        FileNotFoundError: a glob matches no file.
        kogpt2.tokenizer.TokenizerError: the tokenizer cannot be read.
    """
    files: dict[str, int] = {}
    for pattern in config.inputs:
        matched = [m for m in FileSystems.match([pattern])[0].metadata_list if not m.path.endswith("/")]
        if not matched:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.update((m.path, m.size_in_bytes) for m in matched)
    tok = open_tokenizer(config.tokenizer)
    total = sum(files.values())
    counts = shard_counts(config, total)
    names = {s: tuple(records.shard_name(s, i, n) for i in range(n)) for s, n in counts.items()}
    return Plan(tuple(sorted(files)), total, tok.describe(), names, uuid.uuid4().hex[:12])


def signature(config: PreprocessConfig, plan: Plan) -> dict[str, Any]:
    """What makes two runs the same run (``run.json``): inputs, tokenizer and every output-shaping flag."""
    flags = dataclasses.asdict(config)
    for key in ("output", "overwrite", "batch_size", "spill_mb"):
        flags.pop(key)
    flags["inputs"] = list(config.inputs)
    return {"pipeline": "kogpt2.preprocess", "flags": flags, "files": list(plan.files), "tokenizer": plan.tokenizer}


# --- reading ---------------------------------------------------------------------------


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


class _Counters:
    """Beam Metrics counters by name, created once per DoFn instance."""

    def __init__(self) -> None:
        self._counters: dict[str, Any] = {}

    def add(self, counts: dict[str, int]) -> None:
        for name, value in counts.items():
            if value:
                if name not in self._counters:
                    self._counters[name] = Metrics.counter(NAMESPACE, name.replace(".", "_"))
                self._counters[name].inc(value)


class ReadLines(beam.DoFn):
    """Read a byte range of a file as lines of bytes, in batches.

    Main output: ``(path, range_start, first_index, [line bytes...])`` (line endings removed).
    ``line_counts`` output: ``(path, range_start, lines in the range)``.
    """

    LINE_COUNTS = "line_counts"

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def setup(self) -> None:
        self.counters = _Counters()

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


# --- cleaning --------------------------------------------------------------------------


def run_record(key: bytes, payload: bytes) -> bytes:
    """One sorted-run record: ``key`` (KEY_LEN bytes) + payload length + payload."""
    return key + len(payload).to_bytes(4, "big") + payload


def record_payload(record: bytes) -> bytes:
    """The payload of a :func:`run_record`."""
    return record[KEY_LEN + 4 :]


def _rejected_record(file_index: int, path: str, start: int, index: int, exc: UnicodeDecodeError, raw: bytes) -> bytes:
    """A run record for ``rejected-*.jsonl``, sorted by file and line; the line number is resolved at write time."""
    key = struct.pack(">IQQ", file_index, start, index)
    payload = {"file": path, "start": start, "index": index, "reason": str(exc), "raw": textlib.escape_bytes(raw)}
    return run_record(key, json.dumps(payload, ensure_ascii=False).encode("utf-8"))


class CleanLines(beam.DoFn):
    """Decode, normalize, split sentences and filter a batch of lines.

    Main output: a list of texts, or with ``dedup`` a list of ``(text, (path, start, index, sentence))``.
    ``rejected`` output: ``{rejected file name: [run records]}``. ``stats`` output: count dicts.
    """

    REJECTED = "rejected"
    STATS = "stats"

    def __init__(self, config: PreprocessConfig, files: Sequence[str]):
        self.file_index = {path: i for i, path in enumerate(files)}
        self.encoding = config.encoding
        self.min_chars = config.min_chars
        self.split = config.split_sentences
        self.dedup = config.dedup

    def setup(self) -> None:
        self.counters = _Counters()

    def process(self, element: tuple[str, int, int, list[bytes]]) -> Iterator[Any]:
        path, start, first, lines = element
        rejected: list[bytes] = []
        out: list[Any] = []
        empty = too_short = kept = candidates = split_total = split_short = 0
        encoding, min_chars, split, dedup = self.encoding, self.min_chars, self.split, self.dedup
        for index, raw in enumerate(lines, first):
            try:
                line = textlib.decode_line(raw, encoding, file_start=start == 0 and index == 0)
            except UnicodeDecodeError as exc:
                file_index = self.file_index.get(path, len(self.file_index))
                rejected.append(_rejected_record(file_index, path, start, index, exc, raw))
                continue
            norm = textlib.normalize_text(line)
            if not norm:
                empty += 1
                continue
            if split:
                sentences = textlib.split_sentences(norm)
                good = [s for s in sentences if textlib.filter_reason(s, min_chars) is None]
                split_total += len(sentences)
                split_short += len(sentences) - len(good)
            else:
                good = [norm] if textlib.filter_reason(norm, min_chars) is None else []
            if not good:
                too_short += 1
                continue
            kept += 1
            candidates += len(good)
            if dedup:
                out.extend((s, (path, start, index, j)) for j, s in enumerate(good))
            else:
                out.extend(good)
        stats = {
            "rejected": len(rejected),
            "filtered.empty": empty,
            "filtered.too_short": too_short,
            # with dedup, a line is kept only if one of its sentences survives Dedup
            "dedup.candidate_lines" if dedup else "kept": kept,
            "sentences.candidates": candidates,
            "sentences.split": split_total,
            "sentences.too_short": split_short,
        }
        self.counters.add(stats)
        if out:
            yield out
        if rejected:
            yield beam.pvalue.TaggedOutput(self.REJECTED, {REJECTED_FILE: rejected})
        yield beam.pvalue.TaggedOutput(self.STATS, stats)


class Dedup(beam.PTransform):
    """Keep the first occurrence (lowest file, range, line, sentence) of each normalized text.

    Input: lists of ``(text, location)``. Output: ``(texts, stats)`` PCollections: lists of
    texts and count dicts (``sentences.unique``; with sentence splitting ``dedup.kept_lines``, the lines
    still holding a sentence).
    """

    def __init__(self, batch_size: int, split_sentences: bool):
        super().__init__()
        self.batch_size = batch_size
        self.split_sentences = split_sentences

    def expand(self, batches: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        firsts = batches | "Explode" >> beam.FlatMap(lambda batch: batch) | "FirstOccurrence" >> beam.CombinePerKey(min)
        stats = [
            firsts
            | "CountUnique" >> beam.combiners.Count.Globally()
            | "UniqueStats" >> beam.Map(lambda n: {"sentences.unique": n})
        ]
        if self.split_sentences:
            stats.append(
                firsts
                | "LineOf" >> beam.Map(lambda kv: kv[1][:3])
                | "DistinctLines" >> beam.Distinct()
                | "CountLines" >> beam.combiners.Count.Globally()
                | "LineStats" >> beam.Map(lambda n: {"dedup.kept_lines": n})
            )
        texts = (
            firsts
            | "Rebatch" >> beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size)
            | "Texts" >> beam.Map(lambda batch: [text for text, _ in batch])
        )
        return texts, stats | "DedupCounts" >> beam.Flatten()


# --- tokens and examples ---------------------------------------------------------------


class Tokenize(beam.DoFn):
    """Encode a batch of texts: ``(stable_hash(text), <s> + ids + </s>)`` pairs. Tokenizer loaded in setup()."""

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = tokenizer_path

    def setup(self) -> None:
        self.tok = open_tokenizer(self.tokenizer_path)

    def process(self, texts: list[str]) -> Iterator[list[tuple[bytes, list[int]]]]:
        bos, eos = self.tok.bos_id, self.tok.eos_id
        encoded = self.tok.encode_batch(texts)
        yield [(records.stable_hash(t), records.frame(ids, bos, eos)) for t, ids in zip(texts, encoded, strict=True)]


class MakeExamples(beam.DoFn):
    """Assign split and shard by the text hash; fit, pad and serialize (or keep whole for packing).

    Main output: ``{shard file name: [run records]}`` per batch, keyed by the text hash and
    window index. ``stats`` output.
    """

    STATS = "stats"

    def __init__(self, config: PreprocessConfig, plan: Plan):
        self.max_len = config.max_len
        self.overflow = config.overflow
        self.packing = config.packing
        self.val_fraction = float(config.val_fraction)
        self.names = plan.shard_names
        self.pad_id = int(plan.tokenizer["pad_id"])
        self.unk_id = int(plan.tokenizer["unk_id"])

    def setup(self) -> None:
        self.counters = _Counters()

    def process(self, batch: list[tuple[bytes, list[int]]]) -> Iterator[Any]:
        # Per split (0 = train, 1 = validation): tokens, <unk> tokens, sequences.
        tokens, unks, sequences = [0, 0], [0, 0], [0, 0]
        overflowed = 0
        items: dict[str, list[bytes]] = defaultdict(list)
        max_len, unk, pad_id, packing = self.max_len, self.unk_id, self.pad_id, self.packing
        names = (self.names["train"], self.names["validation"])
        for digest, framed in batch:
            v = records.SPLITS.index(records.assign_split(digest, self.val_fraction))
            shards = names[v]
            out = items[shards[records.assign_shard(digest, len(shards))] if len(shards) > 1 else shards[0]]
            if packing:
                out.append(run_record(digest + b"\0\0\0\0", array("i", framed).tobytes()))
                tokens[v] += len(framed)
                unks[v] += framed.count(unk)
                continue
            if len(framed) <= max_len:
                pieces = [framed]
            else:
                overflowed += 1
                pieces = records.fit(framed, max_len, self.overflow)
            sequences[v] += len(pieces)
            for k, piece in enumerate(pieces):
                n = len(piece)
                example = records.serialize_example(piece + [pad_id] * (max_len - n) if n < max_len else piece, n)
                out.append(digest + k.to_bytes(4, "big") + len(example).to_bytes(4, "big") + example)
                tokens[v] += n
                unks[v] += piece.count(unk)
        stats = {"truncated" if self.overflow == "truncate" else "windowed": overflowed}
        for v, split in enumerate(records.SPLITS):
            stats.update({f"tokens.{split}": tokens[v], f"unk.{split}": unks[v], f"sequences.{split}": sequences[v]})
        self.counters.add(stats)
        yield dict(items)
        yield beam.pvalue.TaggedOutput(self.STATS, stats)


# --- sorted runs and shard writing -----------------------------------------------------


def _ids_from_bytes(data: bytes) -> list[int]:
    """Token ids spilled as native int32 bytes (``array('i', ids).tobytes()``)."""
    ids = array("i")
    ids.frombytes(data)
    return ids.tolist()


def _write_records(f: Any, recs: Iterable[bytes]) -> tuple[int, int]:
    """Write run records; return (bytes, records) written."""
    nbytes = count = 0
    chunk: list[bytes] = []
    for rec in recs:
        chunk.append(rec)
        if len(chunk) == 4096:
            data = b"".join(chunk)
            f.write(data)
            nbytes, count, chunk = nbytes + len(data), count + len(chunk), []
    data = b"".join(chunk)
    f.write(data)
    return nbytes + len(data), count + len(chunk)


def _read_records(ref: tuple[str, int, int, int], block: int = 1 << 20) -> Iterator[bytes]:
    """Stream the records of one sorted run section ``(path, offset, bytes, records)``."""
    path, offset, nbytes, _ = ref
    head = KEY_LEN + 4
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
            while pos + head <= n:
                end = pos + head + int.from_bytes(buf[pos + KEY_LEN : pos + head], "big")
                if end > n:
                    break
                yield buf[pos:end]
                pos = end
            buf = buf[pos:]
        if buf:
            raise OSError(f"{path}: truncated record at the end of a sorted run")


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

    def process(self, items: dict[str, list[bytes]]) -> Iterator[tuple[str, tuple[str, int, int, int]]]:
        for name, recs in items.items():
            self.buffer[name].extend(recs)
            self.size += sum(map(len, recs)) + _RECORD_OVERHEAD * len(recs)
        if self.size >= self.buffer_bytes:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        for out in self._flush():
            yield GlobalWindows.windowed_value(out)

    def _flush(self) -> Iterator[tuple[str, tuple[str, int, int, int]]]:
        if not self.buffer:
            return
        path = f"{self.prefix}{uuid.uuid4().hex}.runs"
        offset = 0
        sections = []
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
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

    Input: ``(file name, [run refs, or None])``; side input: the line counts of every range.
    Output: ``{"name", "split", "examples", "sha256"}``.
    """

    def __init__(self, config: PreprocessConfig, plan: Plan, prefix: str):
        self.output = config.output
        self.packing = config.packing
        self.max_len = config.max_len
        self.pad_id = int(plan.tokenizer["pad_id"])
        self.prefix = prefix

    def process(
        self, element: tuple[str, Iterable[Any]], line_counts: list[tuple[str, int, int]]
    ) -> Iterator[dict[str, Any]]:
        name, refs = element
        runs = self._reduce_fanin(sorted(r for r in refs if r is not None))
        stream = heapq.merge(*(_read_records(r) for r in runs))
        path = join(self.output, name)
        if name == REJECTED_FILE:
            yield {"name": name, "split": "rejected", **self._write_rejected(path, stream, line_counts)}
            return
        if self.packing:
            seqs = (_ids_from_bytes(record_payload(rec)) for rec in stream)
            examples: Iterable[bytes] = (
                records.serialize_example(ids, n) for ids, n in records.pack(seqs, self.max_len, self.pad_id)
            )
        else:
            examples = map(record_payload, stream)
        yield {"name": name, "split": name.split("-", 1)[0], **_write_tfrecord(path, examples)}

    def _reduce_fanin(self, refs: list[Any]) -> list[Any]:
        """Merge runs in groups until at most MAX_FANIN remain (bounded open files)."""
        while len(refs) > MAX_FANIN:
            merged = []
            for i in range(0, len(refs), MAX_FANIN):
                path = f"{self.prefix}{uuid.uuid4().hex}.runs"
                with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                    nbytes, count = _write_records(f, heapq.merge(*(_read_records(r) for r in refs[i : i + MAX_FANIN])))
                merged.append((path, 0, nbytes, count))
            refs = merged
        return refs

    @staticmethod
    def _write_rejected(path: str, stream: Iterable[bytes], line_counts: list[tuple[str, int, int]]) -> dict[str, Any]:
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
        with FileSystems.create(
            path, mime_type="application/json", compression_type=CompressionTypes.UNCOMPRESSED
        ) as f:
            for record in stream:
                rec = json.loads(record_payload(record))
                line = before[(rec["file"], rec["start"])] + rec["index"] + 1
                out = {"file": rec["file"], "line": line, "reason": rec["reason"], "raw": rec["raw"]}
                data = (json.dumps(out, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
                f.write(data)
                digest.update(data)
                count += 1
        return {"examples": count, "sha256": digest.hexdigest()}


def _write_tfrecord(path: str, examples: Iterable[bytes]) -> dict[str, Any]:
    """Write serialized examples as a GZIP TFRecord file (through a local file for remote paths)."""
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    local = FileSystems.get_scheme(path) in (None, "file")
    target = path
    if not local:
        fd, target = tempfile.mkstemp(suffix=".tfrecord.gz")
        os.close(fd)
    if local:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    digest = hashlib.sha256()
    count = 0
    chunk: list[bytes] = []
    with tf.io.TFRecordWriter(target, options=tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
        for data in examples:
            writer.write(data)
            chunk.append(data)
            if len(chunk) == 4096:
                digest.update(b"".join(chunk))  # serialized Examples are self-delimiting
                count += len(chunk)
                chunk = []
        digest.update(b"".join(chunk))
        count += len(chunk)
    if not local:
        with open(target, "rb") as src, FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.remove(target)
    return {"examples": count, "sha256": digest.hexdigest()}


# --- info.json -------------------------------------------------------------------------


class CollectRun(beam.CombineFn):
    """Gather what ``info.json`` needs: ``("counts", dict)`` summed key by key, ``("shard", dict)`` listed.

    Output: ``(counts, shard results sorted by name)``.
    """

    def create_accumulator(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        return {}, []

    def add_input(self, acc: tuple[dict[str, int], list[dict[str, Any]]], item: tuple[str, dict[str, Any]]) -> Any:
        counts, shards = acc
        kind, value = item
        if kind == "counts":
            for key, n in value.items():
                counts[key] = counts.get(key, 0) + n
        else:
            shards.append(value)
        return acc

    def merge_accumulators(self, accs: Iterable[Any]) -> tuple[dict[str, int], list[dict[str, Any]]]:
        out: tuple[dict[str, int], list[dict[str, Any]]] = ({}, [])
        for counts, shards in accs:
            self.add_input(out, ("counts", counts))
            out[1].extend(shards)
        return out

    def extract_output(self, acc: tuple[dict[str, int], list[dict[str, Any]]]) -> Any:
        counts, shards = acc
        return dict(sorted(counts.items())), sorted(shards, key=lambda r: str(r["name"]))


def summarize_counts(config: PreprocessConfig, stats: dict[str, int], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``counts`` block of ``info.json`` from the summed step counts and the written shards.

    Every input line has one fate: ``rejected`` (undecodable), ``filtered`` by reason
    (``empty``, ``too_short``, ``duplicate``: with sentence splitting, a line is filtered when
    none of its sentences is kept) or ``kept``.

    Raises:
        RuntimeError: the accounting does not add up (a bug, never a data problem).
    """
    s = Counter(stats)
    if config.dedup:
        kept = s["dedup.kept_lines"] if config.split_sentences else s["sentences.unique"]
        duplicate = s["dedup.candidate_lines"] - kept
    else:
        kept, duplicate = s["kept"], 0
    filtered = {"empty": s["filtered.empty"], "too_short": s["filtered.too_short"], "duplicate": duplicate}
    examples = {split: sum(r["examples"] for r in shards if r["split"] == split) for split in records.SPLITS}
    tokens = {split: s[f"tokens.{split}"] for split in records.SPLITS}
    total_tokens = sum(tokens.values())
    unk = s["unk.train"] + s["unk.validation"]
    blocks = sum(examples.values())
    counts: dict[str, Any] = {
        "lines_read": s["lines_read"],
        "kept": kept,
        "filtered": filtered,
        "rejected": s["rejected"],
        "truncated": s["truncated"],
        "windowed": s["windowed"],
        "examples": examples,
        "tokens": tokens,
        "unk_tokens": unk,
        "unk_rate": unk / total_tokens if total_tokens else 0.0,
        "packing_efficiency": records.packing_efficiency(total_tokens, blocks, config.max_len)
        if config.packing
        else None,
    }
    if config.split_sentences:
        unique = s["sentences.unique"] if config.dedup else s["sentences.candidates"]
        counts["sentences"] = {
            "split": s["sentences.split"],
            "too_short": s["sentences.too_short"],
            "duplicate": s["sentences.candidates"] - unique,
            "kept": unique,
        }
    accounted = kept + sum(filtered.values()) + counts["rejected"]
    if accounted != counts["lines_read"]:
        raise RuntimeError(
            f"accounting error: lines_read={counts['lines_read']} but kept+filtered+rejected={accounted}: {dict(s)}"
        )
    return counts


def data_fingerprint(shards: list[dict[str, Any]]) -> str:
    """sha256 over the sorted ``name<TAB>records sha256`` lines of the train/validation shards."""
    lines = sorted(f"{r['name']}\t{r['sha256']}\n" for r in shards if r["split"] in records.SPLITS)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def build_info(
    config: PreprocessConfig, plan: Plan, stats: dict[str, int], shards: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``info.json`` document (validated against ``schemas/shard_info.json``)."""
    info = {
        "schema_version": 1,
        "created_by": f"kogpt2-pipeline {kogpt2.__version__}",
        "data_fingerprint": data_fingerprint(shards),
        "fingerprint_method": FINGERPRINT_METHOD,
        "tokenizer": dict(plan.tokenizer),
        "max_len": config.max_len,
        "packing": config.packing,
        "overflow": config.overflow,
        "val_fraction": float(config.val_fraction),
        "encoding": config.encoding,
        "split_sentences": config.split_sentences,
        "min_chars": config.min_chars,
        "dedup": config.dedup,
        "inputs": list(plan.files),
        "counts": summarize_counts(config, stats, shards),
        "shards": {split: list(plan.shard_names[split]) for split in records.SPLITS},
        "rejected_file": REJECTED_FILE,
    }
    validate_info(info)
    return info


class WriteInfo(beam.DoFn):
    """Write ``info.json``, remove the spill files, then write ``COMPLETED``."""

    def __init__(self, config: PreprocessConfig, plan: Plan):
        self.config = config
        self.plan = plan

    def process(self, collected: tuple[dict[str, int], list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        stats, shards = collected
        info = build_info(self.config, self.plan, stats, shards)
        counts = info["counts"]
        if self.config.dedup:
            _Counters().add({"kept": counts["kept"], "filtered.duplicate": counts["filtered"]["duplicate"]})
        output = self.config.output
        write_json(join(output, INFO_FILE), info)
        spills = [m.path for m in FileSystems.match([join(output, SPILL_PREFIX + "*")])[0].metadata_list]
        if spills:
            FileSystems.delete(spills)
        mark_completed(output)
        yield info


# --- the pipeline ----------------------------------------------------------------------


def build_pipeline(p: beam.Pipeline, config: PreprocessConfig, plan: Plan | None = None) -> beam.PCollection:
    """Add the preprocessing steps to ``p``.

    Args:
        p: a pipeline (or ``TestPipeline``).
        config: the run's configuration.
        plan: the resolved inputs and tokenizer (:func:`make_plan` by default).

    Returns:
        A PCollection holding the one ``info.json`` document, once everything is written.
    """
    plan = plan or make_plan(config)
    prefix = join(config.output, f"{SPILL_PREFIX}{plan.run_id}-")
    ranges = (
        p
        | "InputFiles" >> beam.Create(list(plan.files), reshuffle=False)  # the globs, matched at launch
        | "MatchFiles" >> fileio.MatchAll(fileio.EmptyMatchTreatment.DISALLOW)
        | "ReadMatches" >> fileio.ReadMatches(skip_directories=True)
        | "FileSizes" >> beam.Map(lambda f: (f.metadata.path, f.metadata.size_in_bytes))
        | "PlanRanges" >> beam.FlatMapTuple(plan_ranges)
        | "SpreadRanges" >> beam.Reshuffle()
    )
    lines = ranges | "ReadLines" >> beam.ParDo(ReadLines(config.batch_size)).with_outputs(
        ReadLines.LINE_COUNTS, main="lines"
    )
    cleaned = lines.lines | "Clean" >> beam.ParDo(CleanLines(config, plan.files)).with_outputs(
        CleanLines.REJECTED, CleanLines.STATS, main="texts"
    )
    stats = [lines.line_counts | "LinesRead" >> beam.Map(lambda c: {"lines_read": c[2]}), cleaned.stats]
    texts = cleaned.texts
    if config.dedup:
        texts, dedup_stats = texts | "Dedup" >> Dedup(config.batch_size, config.split_sentences)
        stats.append(dedup_stats)
    examples = (
        texts
        | "Tokenize" >> beam.ParDo(Tokenize(config.tokenizer))
        | "MakeExamples" >> beam.ParDo(MakeExamples(config, plan)).with_outputs(MakeExamples.STATS, main="items")
    )
    stats.append(examples.stats)
    # Each spill step stays fused with its producer: a Flatten before it would make the
    # FnApiRunner materialize every example in memory.
    spill_bytes = int(config.spill_mb * (1 << 20))
    example_runs = examples.items | "SpillSortedRuns" >> beam.ParDo(SpillRuns(prefix, spill_bytes))
    rejected_runs = cleaned.rejected | "SpillRejected" >> beam.ParDo(SpillRuns(prefix, spill_bytes))
    every_file = p | "OutputFiles" >> beam.Create([(name, None) for name in plan.all_names], reshuffle=False)
    written = (
        (example_runs, rejected_runs, every_file)
        | "WithEveryFile" >> beam.Flatten()
        | "GroupRuns" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShards(config, plan, prefix), beam.pvalue.AsList(lines.line_counts))
    )
    tagged = [pc | f"Tag{i}" >> beam.Map(lambda counts: ("counts", counts)) for i, pc in enumerate(stats)]
    tagged.append(written | "TagShards" >> beam.Map(lambda shard: ("shard", shard)))
    return (
        tagged
        | "CountsAndShards" >> beam.Flatten()
        | "CollectRun" >> beam.CombineGlobally(CollectRun()).without_defaults()
        | "WriteInfo" >> beam.ParDo(WriteInfo(config, plan))
    )


# --- command line ----------------------------------------------------------------------

_FLAGS: list[str] = []


def make_parser() -> argparse.ArgumentParser:
    """The parser of our flags; everything it does not know goes to Beam."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.preprocess",
        description="Raw Korean text files -> gzip TFRecord shards + info.json (Apache Beam). "
        "Options not listed here are Beam pipeline options (--runner, --direct_num_workers, ...).",
        allow_abbrev=False,
    )

    def add(flag: str, **kwargs: Any) -> None:
        p.add_argument(flag, **kwargs)
        _FLAGS.append(flag)

    d = PreprocessConfig.__dataclass_fields__
    add("--input", action="append", required=True, metavar="GLOB", help="input files (repeatable; gs:// works)")
    add("--tokenizer", required=True, metavar="PATH", help="tokenizer file or model folder")
    add("--output", required=True, metavar="DIR", help="output folder")
    add("--max-len", type=int, default=d["max_len"].default, help="tokens per example incl. <s> and </s> (default 30)")
    add(
        "--val-fraction",
        type=float,
        default=d["val_fraction"].default,
        help="validation share, in [0, 1) (default 0.1)",
    )
    add("--packing", action="store_true", help="pack sentences into full blocks instead of padding each")
    add("--overflow", default="truncate", help="long sentences: truncate (keep the front) or window (default truncate)")
    add("--encoding", default="utf-8", help="input encoding: utf-8 (BOM handled), cp949, euc-kr, ... (default utf-8)")
    add("--split-sentences", action="store_true", help="lines are paragraphs: split them into sentences")
    add("--min-chars", type=int, default=d["min_chars"].default, help="drop texts shorter than this (default 1)")
    add("--dedup", action="store_true", help="drop exact duplicates of normalized texts")
    add("--num-shards", type=int, default=0, help="train shards; 0 = one per 128 MiB of input (default 0)")
    add("--overwrite", action="store_true", help="replace what the output folder holds")
    add("--batch-size", type=int, default=d["batch_size"].default, help=argparse.SUPPRESS)
    add("--spill-mb", type=float, default=d["spill_mb"].default, help=argparse.SUPPRESS)
    return p


def _check_beam_args(beam_args: Sequence[str], ours: Sequence[str]) -> None:
    """Refuse misspelled flags: ours with ``_`` for ``-``, and options Beam does not know either."""
    for arg in beam_args:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name.replace("_", "-") in ours and name not in ours:
            raise ValueError(f"unknown option {name}: did you mean {name.replace('_', '-')}?")
    options = PipelineOptions(list(beam_args))
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()))
    if unknown:
        spelled = {
            a.split("=", 1)[0].lstrip("-").replace("-", "_"): a.split("=", 1)[0] for a in beam_args if a.startswith("-")
        }
        names = ", ".join(spelled.get(u, "--" + u) for u in unknown)
        raise ValueError(f"unknown option(s) {names}: neither a preprocess flag nor a Beam pipeline option")


def parse_args(argv: Sequence[str] | None = None) -> tuple[PreprocessConfig, list[str]]:
    """Split ``argv`` into our config and Beam's arguments.

    Raises:
        ValueError: a flag value is out of range, or an option is unknown.
        SystemExit: argparse's own errors (missing or malformed flags).
    """
    _FLAGS.clear()
    parser = make_parser()
    args, beam_args = parser.parse_known_args(None if argv is None else list(argv))
    _check_beam_args(beam_args, _FLAGS)
    config = PreprocessConfig(
        inputs=tuple(args.input),
        tokenizer=args.tokenizer,
        output=args.output,
        max_len=args.max_len,
        val_fraction=args.val_fraction,
        packing=args.packing,
        overflow=args.overflow,
        encoding=args.encoding,
        split_sentences=args.split_sentences,
        min_chars=args.min_chars,
        dedup=args.dedup,
        num_shards=args.num_shards,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        spill_mb=args.spill_mb,
    )
    return config, beam_args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the preprocessing pipeline from command-line arguments and wait for it.

    Everything is validated (flags, globs, tokenizer, output folder) before the output
    folder is touched.

    Returns:
        The ``info.json`` document written.

    Raises:
        ValueError: bad flag values or unknown options; an unreadable tokenizer.
        FileNotFoundError: a glob matches no file.
        pipelines.common.OutputConflictError: the output folder holds another run.
        RuntimeError: the pipeline finished without writing ``COMPLETED``.
    """
    config, beam_args = parse_args(argv)
    plan = make_plan(config)
    p = create_pipeline(pipeline_options(beam_args))
    build_pipeline(p, config, plan)
    prepare_output(config.output, signature(config, plan), overwrite=config.overwrite)
    p.run().wait_until_finish()
    if not is_completed(config.output):
        raise RuntimeError(f"the pipeline finished but {config.output} has no COMPLETED marker")
    return dict(json.loads(read_text(join(config.output, INFO_FILE))))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, print a summary; errors exit with status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        info = run(argv)
    except (ValueError, FileNotFoundError, OutputConflictError) as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr)
        return 2
    c = info["counts"]
    print(
        f"lines read {c['lines_read']}: kept {c['kept']}, filtered {c['filtered']}, rejected {c['rejected']}; "
        f"examples train {c['examples']['train']}, validation {c['examples']['validation']}; "
        f"truncated {c['truncated']}; data {info['data_fingerprint'][:12]}"
    )
    return 0


if __name__ == "__main__":
    # Run the imported module, not __main__: Beam then pickles the DoFns by reference.
    from pipelines.preprocess import main as _main

    sys.exit(_main())
