"""The text and token steps of the preprocessing pipeline: clean, dedup, tokenize, make examples.

Each is a thin Beam transform over batches; the text and token work itself is done by the
pure functions of :mod:`kogpt2.text` and :mod:`kogpt2.records`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from kogpt2 import records
from kogpt2 import text as textlib
from kogpt2.tokenizer import Tokenizer, load_tokenizer
from pipelines.common import freeze_worker_heap, local_copy
from pipelines.counters import SEQUENCES, TOKENS, UNKS, Count, Counters, StepCounts
from pipelines.preprocess_config import Plan, PreprocessConfig
from pipelines.shards import framing
from pipelines.shards.runs import KEY_LEN, FileBatch, batch_of, run_record
from pipelines.shards.textio import REJECTED_FILE, LineBatch, rejected_entry

_TOKENIZERS: dict[tuple[str, int, int], Tokenizer] = {}


def open_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a local path, or from a local copy of a remote file (``gs://...``).

    Loaded once per process (and file version): the launcher and an in-process worker share it.
    """
    local = local_copy(path)
    try:
        st = os.stat(local)
        key = (os.path.abspath(local), st.st_size, st.st_mtime_ns)
    except OSError:
        return load_tokenizer(local)  # let the loader name the problem
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = load_tokenizer(local)
    return _TOKENIZERS[key]


# --- cleaning --------------------------------------------------------------------------


class CleanLines(beam.DoFn):
    """Decode, normalize, split sentences and filter a batch of lines.

    Main output: a list of texts, or with ``dedup`` a list of ``(text, (path, start, index, sentence))``.
    ``rejected`` output: ``{rejected file name: [run records]}``. ``stats`` output:
    :class:`~pipelines.counters.StepCounts`.
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
        self.counters = Counters()

    def process(self, element: LineBatch) -> Iterator[Any]:
        path, start, first, lines = element
        rejected: list[bytes] = []
        out: list[Any] = []
        too_short = kept = candidates = split_total = split_short = 0
        min_chars, split, dedup = self.min_chars, self.split, self.dedup
        decoded, errors = textlib.decode_lines(lines, self.encoding, file_start=start == 0 and first == 0)
        if errors:
            file_index = self.file_index.get(path, len(self.file_index))
            for k, exc in errors.items():
                rejected.append(run_record(*rejected_entry(file_index, path, start, first + k, exc, lines[k])))
        norms = textlib.normalize_texts(decoded)
        empty = norms.count("") - len(errors)
        if not split and not dedup:
            out = [t for t in norms if t and len(t) >= min_chars]
            kept = candidates = len(out)
            too_short = len(norms) - len(errors) - empty - kept
        else:
            for index, norm in enumerate(norms, first):
                if not norm:
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
        counts = {
            Count.REJECTED: len(rejected),
            Count.REJECTED_UNDECODABLE: len(rejected),
            Count.FILTERED_EMPTY: empty,
            Count.FILTERED_TOO_SHORT: too_short,
            # with dedup, a line is kept only if one of its sentences survives Dedup
            Count.DEDUP_CANDIDATE_LINES if dedup else Count.KEPT: kept,
            Count.SENTENCES_CANDIDATES: candidates,
            Count.SENTENCES_SPLIT: split_total,
            Count.SENTENCES_TOO_SHORT: split_short,
        }
        stats = self.counters.report(counts)
        if out:
            yield out
        if rejected:
            yield beam.pvalue.TaggedOutput(self.REJECTED, {REJECTED_FILE: rejected})
        yield beam.pvalue.TaggedOutput(self.STATS, stats)


class Dedup(beam.PTransform):
    """Keep the first occurrence (lowest file, range, line, sentence) of each normalized text.

    Input: lists of ``(text, location)``. Output: ``(texts, stats)`` PCollections: lists of
    texts and :class:`~pipelines.counters.StepCounts` (``SENTENCES_UNIQUE``; with sentence splitting
    ``DEDUP_KEPT_LINES``, the lines still holding a sentence).
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
            | "UniqueStats" >> beam.Map(lambda n: StepCounts({Count.SENTENCES_UNIQUE: n}))
        ]
        if self.split_sentences:
            stats.append(
                firsts
                | "LineOf" >> beam.Map(lambda kv: kv[1][:3])
                | "DistinctLines" >> beam.Distinct()
                | "CountLines" >> beam.combiners.Count.Globally()
                | "LineStats" >> beam.Map(lambda n: StepCounts({Count.DEDUP_KEPT_LINES: n}))
            )
        texts = (
            firsts
            | "Rebatch" >> beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size)
            | "Texts" >> beam.Map(lambda batch: [text for text, _ in batch])
        )
        return texts, stats | "DedupCounts" >> beam.Flatten()


# --- tokens and examples ---------------------------------------------------------------


class EncodedBatch(NamedTuple):
    """A batch of encoded texts: what :class:`Tokenize` hands to :class:`MakeExamples`.

    Attributes:
        digests: :func:`kogpt2.records.stable_hash` of each text (split and shard follow it).
        flat: ``<s>`` + ids + ``</s>`` of every text, concatenated (int32).
        lengths: tokens per text.
    """

    digests: list[bytes]
    flat: np.ndarray
    lengths: np.ndarray


class OneAhead(beam.DoFn):
    """A DoFn whose work on each element runs on a thread of its own, one element ahead of its output.

    While the thread works on an element, this worker's own thread hands the previous result on
    and goes back upstream for the next element (SentencePiece and numpy release the GIL while
    they work). Subclasses give :meth:`work` (on the thread) and :meth:`emit` (on the worker's
    thread: its outputs, main or tagged).
    """

    thread_name = "work"

    def setup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix=self.thread_name)

    def start_bundle(self) -> None:
        self.pending: deque[tuple[Any, Future[Any]]] = deque()

    def process(self, element: Any) -> Iterator[Any]:
        self.pending.append((element, self.pool.submit(self.work, element)))
        while len(self.pending) > 1:
            element, done = self.pending.popleft()
            yield from self.emit(element, done.result())

    def finish_bundle(self) -> Iterator[Any]:
        while self.pending:
            element, done = self.pending.popleft()
            for out in self.emit(element, done.result()):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
                else:
                    yield GlobalWindows.windowed_value(out)

    def teardown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def work(self, element: Any) -> Any:
        raise NotImplementedError

    def emit(self, element: Any, result: Any) -> Iterator[Any]:
        raise NotImplementedError


class Tokenize(OneAhead):
    """Encode batches of texts (the tokenizer's batch encode): ``(text hashes, <s> + ids + </s> flat, lengths)``.

    A batch is encoded on a thread (:class:`OneAhead`) while this worker's own thread cleans the
    next batch and makes the examples of the previous one, so one worker keeps two cores busy.
    The tokenizer is loaded in setup().
    """

    thread_name = "encode"

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = tokenizer_path

    def setup(self) -> None:
        super().setup()
        self.tok = open_tokenizer(self.tokenizer_path)
        freeze_worker_heap()  # a worker process's modules and tokenizer live as long as it does

    def work(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        flat, lengths = framing.flatten(self.tok.encode_batch(texts))
        return framing.frame_flat(flat, lengths, self.tok.bos_id, self.tok.eos_id)

    def emit(self, texts: list[str], encoded: tuple[np.ndarray, np.ndarray]) -> Iterator[EncodedBatch]:
        yield EncodedBatch(records.stable_hashes(texts), *encoded)


def window_indices(owners: list[int]) -> list[int]:
    """The index of each piece within its sequence, for pieces listed by owning sequence: ``[0, 0, 1, 0] <- [0, 1, 1, 2]``."""
    out, previous, k = [], None, 0
    for owner in owners:
        k = k + 1 if owner == previous else 0
        previous = owner
        out.append(k)
    return out


class MakeExamples(OneAhead):
    """Assign split and shard by the text hash; fit, pad, serialize and frame as TFRecords, a batch at a time.

    With ``packing`` sentences stay whole (token ids) until :class:`~pipelines.shards.writer.WriteShards`
    packs them. Main output: a :class:`~pipelines.shards.runs.FileBatch` per batch: run records
    keyed by the text hash and window index, each with its shard file. ``stats`` output:
    :class:`~pipelines.counters.StepCounts`.
    """

    STATS = "stats"
    thread_name = "examples"

    def __init__(self, config: PreprocessConfig, plan: Plan):
        self.max_len = config.max_len
        self.overflow = config.overflow
        self.packing = config.packing
        self.val_fraction = float(config.val_fraction)
        self.names = plan.shard_names
        self.pad_id = plan.tokenizer.pad_id
        self.unk_id = plan.tokenizer.unk_id

    def setup(self) -> None:
        super().setup()  # the examples of a batch are made on a thread (:class:`OneAhead`)
        self.counters = Counters()

    def emit(self, batch: EncodedBatch, made: tuple[FileBatch, dict[Count, int]]) -> Iterator[Any]:
        items, counts = made
        yield items
        yield beam.pvalue.TaggedOutput(self.STATS, self.counters.report(counts))

    def work(self, batch: EncodedBatch) -> tuple[FileBatch, dict[Count, int]]:
        """The run records of a batch, with their output files, and its counts."""
        digests, flat, lengths = batch
        names = (self.names["train"], self.names["validation"])
        splits, shards = framing.split_masks(digests, self.val_fraction, (len(names[0]), len(names[1])))
        max_len, packing = self.max_len, self.packing
        overflowed = 0 if packing else int((lengths > max_len).sum())
        if packing:  # whole sentences (int32 ids), packed into blocks by WriteShards
            owners: np.ndarray = np.arange(len(digests))
            windows = None
            pieces, piece_lengths = flat, lengths
            data, sizes = flat.astype(np.int32).view(np.uint8), lengths * 4
        else:
            if self.overflow == "truncate" or not overflowed:
                owners, windows = np.arange(len(digests)), None
                pieces, piece_lengths = framing.truncate_flat(flat, lengths, max_len)
            else:
                owned, fitted = framing.fit_batch(framing.unflatten(flat, lengths), max_len, self.overflow)
                owners, windows = np.asarray(owned, dtype=np.int64), window_indices(owned)
                pieces, piece_lengths = framing.flatten(fitted)
            data, sizes = framing.tfrecord_example_batch(pieces, piece_lengths, max_len, self.pad_id)
        # per split (0 = train, 1 = validation): tokens, <unk> tokens, sequences
        piece_split = np.asarray(splits, dtype=np.int64)[owners]
        rows = np.repeat(np.arange(len(piece_lengths)), piece_lengths)
        unk_split = piece_split[rows[pieces == self.unk_id]]
        tokens = np.bincount(piece_split, weights=piece_lengths, minlength=2).astype(np.int64).tolist()
        unks = np.bincount(unk_split, minlength=2).tolist()
        sequences = [0, 0] if packing else np.bincount(piece_split, minlength=2).tolist()
        # sort keys: the text's hash, then the window's index (big-endian)
        keys = np.zeros((len(owners), KEY_LEN), dtype=np.uint8)
        keys[:, :16] = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16)[owners]
        if windows is not None:
            keys[:, 16:] = np.asarray(windows, dtype=">u4").view(np.uint8).reshape(-1, 4)
        # the output file of each piece: its split's shard, numbered train files first
        files = piece_split * len(names[0]) + np.asarray(shards, dtype=np.int64)[owners]
        items = FileBatch((*names[0], *names[1]), files, batch_of(keys, data, sizes))
        counts = {Count.TRUNCATED if self.overflow == "truncate" else Count.WINDOWED: overflowed}
        for v, split in enumerate(records.SPLITS):
            counts.update({TOKENS[split]: tokens[v], UNKS[split]: unks[v], SEQUENCES[split]: sequences[v]})
        return items, counts
