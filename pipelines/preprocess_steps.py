"""The text and token steps of the preprocessing pipeline: clean, dedup, tokenize, make examples.

Each is a thin Beam transform over batches; the text and token work itself is done by the
pure functions of :mod:`kogpt2.text` and :mod:`kogpt2.records`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import apache_beam as beam

from kogpt2 import records
from kogpt2 import text as textlib
from kogpt2.tokenizer import Tokenizer, load_tokenizer
from pipelines.common import local_copy
from pipelines.counters import Counters
from pipelines.sorted_shards import ids_payload, run_record
from pipelines.textio import REJECTED_FILE, rejected_entry

if TYPE_CHECKING:
    from pipelines.preprocess import Plan, PreprocessConfig


def open_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a local path, or from a local copy of a remote file (``gs://...``)."""
    return load_tokenizer(local_copy(path))


# --- cleaning --------------------------------------------------------------------------


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
        self.counters = Counters()

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
                rejected.append(run_record(*rejected_entry(file_index, path, start, index, exc, raw)))
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
            "rejected.undecodable": len(rejected),
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
        self.counters = Counters()

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
                out.append(run_record(digest + b"\0\0\0\0", ids_payload(framed)))
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
                out.append(run_record(digest + k.to_bytes(4, "big"), example))
                tokens[v] += n
                unks[v] += piece.count(unk)
        stats = {"truncated" if self.overflow == "truncate" else "windowed": overflowed}
        for v, split in enumerate(records.SPLITS):
            stats.update({f"tokens.{split}": tokens[v], f"unk.{split}": unks[v], f"sequences.{split}": sequences[v]})
        self.counters.add(stats)
        yield dict(items)
        yield beam.pvalue.TaggedOutput(self.STATS, stats)
