"""Corpus preprocessing: raw Korean text files -> gzip TFRecord shards + ``info.json``.

``python -m pipelines.preprocess --input GLOB --tokenizer PATH --output DIR [options] [Beam options]``

Steps (each a labelled Beam transform):

1. The input globs are matched when the command starts (any Beam filesystem, ``gs://`` too: an
   empty glob fails before anything is written); ``MatchFiles`` / ``ReadMatches`` the files, cut
   each into byte ranges (``PlanRanges``; gzip/bzip2 files are one range) and ``ReadLines`` them
   as bytes, remembering file, range and line index (:mod:`pipelines.textio`).
2. ``Clean``: decode (undecodable lines go to ``rejected-*.jsonl``), normalize, optionally
   split sentences, filter; optionally ``Dedup`` exact duplicates (:mod:`pipelines.preprocess_steps`).
3. ``Tokenize`` (tokenizer loaded in ``setup``): ``<s>`` + ids + ``</s>``.
4. ``MakeExamples``: split by a hash of the normalized text, pick the shard by the same hash,
   fit to ``max_len`` (the front is kept) and serialize; with ``--packing`` sentences stay
   whole until ``WriteShards`` packs them.
5. ``SpillSortedRuns`` / ``WriteShards``: each worker sorts what it holds by key and spills
   sorted runs to ``_spill-*`` files; one task per shard merges its runs (streaming) and
   writes the shard. Shards are byte-identical on rerun, whatever the runner's order, and
   memory stays flat because examples never pass through an in-memory shuffle
   (:mod:`pipelines.sorted_shards`).
6. ``WriteInfo``: ``info.json`` (checked against ``schemas/shard_info.json``), the spill files
   are removed, and ``COMPLETED`` is written last.

This module holds the configuration, the pipeline graph, ``info.json`` and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import sys
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions

import kogpt2
from kogpt2 import records
from kogpt2 import text as textlib
from kogpt2.schemas import validate_info
from pipelines.common import (
    COMPLETED,
    RUN_FILE,
    OutputConflictError,
    commit_staged,
    copy_file,
    create_pipeline,
    file_sizes,
    is_completed,
    join,
    list_folder,
    mark_completed,
    pipeline_options,
    read_text,
    remove_folder,
    remove_stale_staging,
    staging_folder,
    write_json,
)
from pipelines.counters import NAMESPACE as NAMESPACE  # re-exported
from pipelines.counters import Counters
from pipelines.preprocess_steps import CleanLines, Dedup, MakeExamples, Tokenize, open_tokenizer
from pipelines.sorted_shards import SPILL_PREFIX as SPILL_PREFIX  # re-exported
from pipelines.sorted_shards import SpillRuns, WriteShards, delete_spills, spill_prefix
from pipelines.textio import MAX_LINE_BYTES, REJECT_REASONS, REJECTED_FILE, ReadLines, match_files, plan_ranges

INFO_FILE = "info.json"
#: Auto sharding: one train shard per this many input bytes (at most MAX_AUTO_SHARDS).
AUTO_SHARD_BYTES = 128 << 20
MAX_AUTO_SHARDS = 1000
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
        max_line_bytes: longest line read, in bytes (terminator excluded); longer lines are
            dead letters (``too_long``).
        allow_empty: finish (``COMPLETED``) even when a split training needs has no example.
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
    max_line_bytes: int = MAX_LINE_BYTES
    allow_empty: bool = False
    batch_size: int = 4096
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
        _check_int("max_line_bytes", self.max_line_bytes, 1, "a positive number of bytes (default 1 MiB)")
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
    #: a local copy of the tokenizer file, and the name it gets beside the shards
    tokenizer_file: tuple[str, str] = ("", "")
    #: ``path -> [size, mtime]`` of the matched files: a changed corpus is a different run
    file_stats: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def all_names(self) -> list[str]:
        return [*self.shard_names["train"], *self.shard_names["validation"], REJECTED_FILE]


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
    files = match_files(config.inputs)
    tok = open_tokenizer(config.tokenizer)
    total = sum(files.values())
    counts = shard_counts(config, total)
    names = {s: tuple(records.shard_name(s, i, n) for i in range(n)) for s, n in counts.items()}
    paths = tuple(sorted(files))
    return Plan(
        paths,
        total,
        tok.describe(),
        names,
        uuid.uuid4().hex[:12],
        (str(tok.path), tok.canonical_name),
        file_sizes(paths),
    )


def signature(config: PreprocessConfig, plan: Plan) -> dict[str, Any]:
    """What makes two runs the same run (``run.json``): inputs, tokenizer and every output-shaping flag.

    The input files are named with their size and modification time, so a corpus edited in
    place (appended to, replaced) makes a different run.
    """
    flags = dataclasses.asdict(config)
    for key in ("output", "overwrite", "batch_size", "spill_mb", "allow_empty"):
        flags.pop(key)
    flags["inputs"] = list(config.inputs)
    return {
        "pipeline": "kogpt2.preprocess",
        "flags": flags,
        "files": list(plan.files),
        "file_stats": {path: list(plan.file_stats.get(path, [])) for path in plan.files},
        "tokenizer": plan.tokenizer,
    }


# --- the output folder -----------------------------------------------------------------

#: What :func:`output_action` decides.
NEW, ALREADY_COMPLETE, STAGE = "new", "already complete", "stage"


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def output_action(folder: str, sig: dict[str, Any], *, overwrite: bool) -> str:
    """What a run does with its output folder, decided before anything in it is written or deleted.

    - :data:`NEW`: the folder is missing or empty (a lock file aside): build in it directly.
    - :data:`ALREADY_COMPLETE`: it holds a ``COMPLETED`` run with this signature (same flags,
      tokenizer, input files, sizes and modification times) and ``overwrite`` is off: nothing to do.
    - :data:`STAGE`: it holds an unfinished run with this signature, or (``overwrite``) any
      run: build in a staging folder inside it and swap the files in when the run commits
      (:func:`pipelines.common.commit_staged`), so readers see the old files until then.

    Raises:
        OutputConflictError: the folder holds something else and ``overwrite`` is off.
    """
    from kogpt2.paths import LOCK_FILE

    existing = [p for p in list_folder(folder) if _name(p) != LOCK_FILE]
    if not existing:
        return NEW
    previous = None
    if RUN_FILE in {_name(p) for p in existing}:
        try:
            previous = json.loads(read_text(join(folder, RUN_FILE)))
        except (OSError, ValueError):
            previous = None
    same = previous == json.loads(json.dumps(sig))
    if same and not overwrite and COMPLETED in {_name(p) for p in existing}:
        return ALREADY_COMPLETE
    if same or overwrite:
        return STAGE
    what = "a different run" if previous is not None else "files not written by this pipeline"
    differ = ""
    if isinstance(previous, dict):
        keys = sorted(k for k in set(previous) | set(sig) if previous.get(k) != sig.get(k))
        differ = f"; it differs in {', '.join(keys)}"
    raise OutputConflictError(
        f"output folder {folder} already holds {what} ({len(existing)} files{differ}). "
        "Choose another --output, or pass --overwrite to replace its contents (the old files stay "
        "readable until the new run finishes)."
    )


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

    Every input line has one fate: ``rejected`` (by reason: ``undecodable``, ``too_long``),
    ``filtered`` by reason (``empty``, ``too_short``, ``duplicate``: with sentence splitting, a
    line is filtered when none of its sentences is kept) or ``kept``. A corrupt compressed file
    is not a line: its lines read before the damage have their own fates, and the file is listed
    in ``corrupt_inputs`` (one file-level dead letter each, ``line`` null).

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
        "rejected_by_reason": {r: s[f"rejected.{r}"] for r in REJECT_REASONS if r != "corrupt_input"},
        "corrupt_inputs": sorted(k.split(":", 1)[1] for k in s if k.startswith("corrupt_input:")),
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


class EmptyOutputError(RuntimeError):
    """A run ended with no example in a split training needs (and ``--allow-empty`` was not given)."""


def empty_splits(config: PreprocessConfig, counts: dict[str, Any]) -> list[str]:
    """The splits training needs that hold no example: ``train``, and ``validation`` when ``val_fraction > 0``."""
    needed = ["train", "validation"] if float(config.val_fraction) > 0 else ["train"]
    return [split for split in needed if not counts["examples"][split]]


def empty_output_message(config: PreprocessConfig, info: dict[str, Any]) -> str:
    """Why a run without ``COMPLETED`` is refused, with the counts that explain it."""
    c = info["counts"]
    splits = " and ".join(empty_splits(config, c))
    return (
        f"no {splits} examples: of {c['lines_read']} lines read, {c['kept']} kept, filtered {c['filtered']}, "
        f"rejected {c['rejected']} {c.get('rejected_by_reason', {})}"
        + (f", corrupt input files {c['corrupt_inputs']}" if c.get("corrupt_inputs") else "")
        + f"; see {join(config.output, REJECTED_FILE)} (wrong --encoding? UTF-16 input?). "
        f"{config.output} is not marked COMPLETED; pass --allow-empty to accept an empty split"
    )


class WriteInfo(beam.DoFn):
    """Write ``info.json``, remove the spill files, then write ``COMPLETED``.

    A split training needs without examples (:func:`empty_splits`) leaves the folder without
    ``COMPLETED`` unless ``allow_empty``; :func:`run` then raises :class:`EmptyOutputError`.
    """

    def __init__(self, config: PreprocessConfig, plan: Plan, target: str | None = None):
        self.config = config
        self.plan = plan
        self.target = target or config.output

    def process(self, collected: tuple[dict[str, int], list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        stats, shards = collected
        info = build_info(self.config, self.plan, stats, shards)
        counts = info["counts"]
        if self.config.dedup:
            Counters().add({"kept": counts["kept"], "filtered.duplicate": counts["filtered"]["duplicate"]})
        output = self.target
        write_json(join(output, INFO_FILE), info)
        delete_spills(output)
        if self.config.allow_empty or not empty_splits(self.config, counts):
            mark_completed(output)
        yield info


# --- the pipeline ----------------------------------------------------------------------


def build_pipeline(
    p: beam.Pipeline, config: PreprocessConfig, plan: Plan | None = None, target: str | None = None
) -> beam.PCollection:
    """Add the preprocessing steps to ``p``.

    Args:
        p: a pipeline (or ``TestPipeline``).
        config: the run's configuration.
        plan: the resolved inputs and tokenizer (:func:`make_plan` by default).
        target: the folder the files are written to (``config.output`` by default; a staging
            folder when a finished run must stay readable until this one commits).

    Returns:
        A PCollection holding the one ``info.json`` document, once everything is written.
    """
    plan = plan or make_plan(config)
    target = target or config.output
    prefix = spill_prefix(target, plan.run_id)
    ranges = (
        p
        | "InputFiles" >> beam.Create(list(plan.files), reshuffle=False)  # the globs, matched at launch
        | "MatchFiles" >> fileio.MatchAll(fileio.EmptyMatchTreatment.DISALLOW)
        | "ReadMatches" >> fileio.ReadMatches(skip_directories=True)
        | "FileSizes" >> beam.Map(lambda f: (f.metadata.path, f.metadata.size_in_bytes))
        | "PlanRanges"
        >> beam.FlatMapTuple(
            functools.partial(_plan_ranges, workers=direct_workers(p.options), compressed=compressed_count(plan.files))
        )
        | "SpreadRanges" >> beam.Reshuffle()
    )
    reader = ReadLines(config.batch_size, plan.files, config.max_line_bytes)
    lines = ranges | "ReadLines" >> beam.ParDo(reader).with_outputs(
        ReadLines.LINE_COUNTS, ReadLines.REJECTED, ReadLines.STATS, main="lines"
    )
    cleaned = lines.lines | "Clean" >> beam.ParDo(CleanLines(config, plan.files)).with_outputs(
        CleanLines.REJECTED, CleanLines.STATS, main="texts"
    )
    stats = [lines.line_counts | "LinesRead" >> beam.Map(lambda c: {"lines_read": c[2]}), lines.stats, cleaned.stats]
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
    unread_runs = lines.rejected | "SpillUnread" >> beam.ParDo(SpillRuns(prefix, spill_bytes))
    pad_id = int(plan.tokenizer["pad_id"])
    writer = WriteShards(target, prefix, packing=config.packing, max_len=config.max_len, pad_id=pad_id)
    every_file = p | "OutputFiles" >> beam.Create([(name, None) for name in plan.all_names], reshuffle=False)
    written = (
        (example_runs, rejected_runs, unread_runs, every_file)
        | "WithEveryFile" >> beam.Flatten()
        | "GroupRuns" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(writer, beam.pvalue.AsList(lines.line_counts))
    )
    tagged = [pc | f"Tag{i}" >> beam.Map(lambda counts: ("counts", counts)) for i, pc in enumerate(stats)]
    tagged.append(written | "TagShards" >> beam.Map(lambda shard: ("shard", shard)))
    return (
        tagged
        | "CountsAndShards" >> beam.Flatten()
        | "CollectRun" >> beam.CombineGlobally(CollectRun()).without_defaults()
        | "WriteInfo" >> beam.ParDo(WriteInfo(config, plan, target))
    )


def direct_workers(options: PipelineOptions | None) -> int:
    """Worker processes (threads) of a local run (``--direct_num_workers``, 0 = one per core); 0 on other runners."""
    from apache_beam.options.pipeline_options import DirectOptions

    from pipelines.common import is_direct

    if options is None or not is_direct(options):
        return 0
    workers = options.view_as(DirectOptions).direct_num_workers
    return max(1, workers or (os.cpu_count() or 1))


#: On a distributed runner, a compressed input is read in one part per this many bytes, at most
#: MAX_PARTS: every part decompresses the whole file, so more parts cost more CPU than they save.
COMPRESSED_PART_BYTES = 64 << 20
MAX_PARTS = 4


def compressed_count(files: Sequence[str]) -> int:
    """How many of the input files are compressed (read whole)."""
    from apache_beam.io.filesystem import CompressionTypes

    return sum(CompressionTypes.detect_compression_type(f) != CompressionTypes.UNCOMPRESSED for f in files)


def compressed_parts(size: int, workers: int, compressed: int) -> int:
    """Parts a compressed input of ``size`` bytes is read in (:func:`pipelines.textio.plan_ranges`).

    Locally: enough for every worker to have one, counting the other compressed files (2 workers
    and one ``.gz``: 2 parts; 2 workers and ten: 1). On other runners (``workers`` 0): one per
    64 MiB, at most 4. The shards do not depend on it.
    """
    if workers:
        return max(1, -(-workers // max(1, compressed)))
    return min(MAX_PARTS, max(1, math.ceil(size / COMPRESSED_PART_BYTES)))


def _plan_ranges(path: str, size: int, workers: int, compressed: int = 1) -> list[tuple[str, int, int]]:
    return plan_ranges(path, size, compressed_parts=compressed_parts(size, workers, compressed))


def finished_info(config: PreprocessConfig) -> dict[str, Any]:
    """The ``info.json`` of a finished run.

    Raises:
        EmptyOutputError: a split training needs has no example (no ``COMPLETED``).
        RuntimeError: no ``COMPLETED`` for another reason.
    """
    if not is_completed(config.output):
        try:
            info = json.loads(read_text(join(config.output, INFO_FILE)))
        except Exception:
            info = None
        if info is not None and empty_splits(config, info["counts"]):
            raise EmptyOutputError(empty_output_message(config, info))
        raise RuntimeError(f"the pipeline finished but {config.output} has no COMPLETED marker")
    return dict(json.loads(read_text(join(config.output, INFO_FILE))))


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
    add(
        "--max-line-bytes",
        type=int,
        default=d["max_line_bytes"].default,
        help="longest line in bytes; longer lines are rejected as too_long (default 1048576 = 1 MiB)",
    )
    add(
        "--allow-empty",
        action="store_true",
        help="mark the run COMPLETED even when train (or validation, with --val-fraction > 0) has no example",
    )
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
    # every flag but --input is stored under the field of its name (--max-len -> max_len)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(PreprocessConfig) if f.name != "inputs"}
    config = PreprocessConfig(inputs=tuple(args.input), **fields)
    return config, beam_args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the preprocessing pipeline from command-line arguments and wait for it.

    Returns:
        The ``info.json`` document written (or already there: see :func:`execute`).

    Raises:
        See :func:`execute`.
    """
    return execute(argv)[0]


def execute(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], str]:
    """Run the preprocessing pipeline, unless its output folder already holds this very run.

    Everything is validated (flags, globs, tokenizer, output folder) before the output
    folder is touched. A folder that is ``COMPLETED`` with the same signature (``run.json``:
    flags, tokenizer, input files with their sizes and modification times) is left as it is
    (unless ``--overwrite``). A folder holding files is never cleared first: the run builds in
    a staging folder inside it and swaps its files in when it commits (:func:`output_action`).

    Returns:
        ``(info.json document, status)``: status :data:`NEW`, :data:`STAGE` (files swapped
        in over a previous run) or :data:`ALREADY_COMPLETE` (nothing was run or written).

    Raises:
        ValueError: bad flag values or unknown options; an unreadable tokenizer.
        FileNotFoundError: a glob matches no file.
        pipelines.common.OutputConflictError: the output folder holds another run.
        EmptyOutputError: a split training needs has no example and ``--allow-empty`` was not given.
        RuntimeError: the pipeline finished without writing ``COMPLETED``.
    """
    from apache_beam.io.filesystems import FileSystems

    from kogpt2.paths import LOCK_FILE, FolderLock, refuse_output_over_inputs

    config, beam_args = parse_args(argv)
    plan = make_plan(config)
    refuse_output_over_inputs(config.output, [*plan.files, config.tokenizer])
    options = pipeline_options(beam_args)
    sig = signature(config, plan)
    local = FileSystems.get_scheme(config.output) in (None, "file")
    lock = FolderLock(config.output, job="pipelines.preprocess") if local else None
    if lock is not None:
        lock.acquire()  # a second run into this folder is refused while this one lives
    try:
        action = output_action(config.output, sig, overwrite=config.overwrite)
        if action == ALREADY_COMPLETE:
            return finished_info(config), ALREADY_COMPLETE
        remove_stale_staging(config.output)  # left by runs that died (we hold the lock)
        target = config.output if action == NEW else staging_folder(config.output, plan.run_id)
        if not FileSystems.exists(target):
            FileSystems.mkdirs(target)
        try:
            write_json(join(target, RUN_FILE), sig)
            # the shards' tokenizer travels with them: `kogpt2 train --model small` finds it there
            copy_file(plan.tokenizer_file[0], join(target, plan.tokenizer_file[1]))
            p = create_pipeline(options)
            build_pipeline(p, config, plan, target)
            p.run().wait_until_finish()
        except BaseException:
            if target != config.output:
                remove_folder(target)  # the previous run stays as it was
            raise
        if target != config.output:
            commit_staged(target, config.output, keep=(LOCK_FILE,))
    finally:
        if lock is not None:
            lock.release()
    return finished_info(config), action


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, print a summary; errors exit with status 2."""
    from kogpt2.paths import OutputLockedError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        info, status = execute(argv)
    except (ValueError, FileNotFoundError, OutputConflictError, OutputLockedError) as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr)
        return 2
    except EmptyOutputError as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr)
        return 1
    if status == ALREADY_COMPLETE:
        print(
            f"{parse_args(argv)[0].output} is already complete: same inputs (sizes, modification times), tokenizer "
            "and flags; nothing to do (pass --overwrite to rebuild it)"
        )
    print(summary_line(info))
    return 0


def summary_line(info: dict[str, Any]) -> str:
    """The one-line summary ``main`` prints; names corrupt input files when there are any."""
    c = info["counts"]
    line = (
        f"lines read {c['lines_read']}: kept {c['kept']}, filtered {c['filtered']}, rejected {c['rejected']}"
        f"{' ' + str(c['rejected_by_reason']) if c.get('rejected') else ''}; "
        f"examples train {c['examples']['train']}, validation {c['examples']['validation']}; "
        f"truncated {c['truncated']}; data {info['data_fingerprint'][:12]}"
    )
    corrupt = c.get("corrupt_inputs") or []
    if corrupt:
        line += (
            f"; WARNING: {len(corrupt)} corrupt or truncated input file(s), read only up to the damage: "
            f"{', '.join(corrupt)} (see {info.get('rejected_file', REJECTED_FILE)})"
        )
    return line


if __name__ == "__main__":
    # Run the imported module, not __main__: Beam then pickles the DoFns by reference.
    from pipelines.preprocess import main as _main

    sys.exit(_main())
