"""Corpus preprocessing: raw Korean text files -> gzip TFRecord shards + ``info.json``.

``python -m pipelines.preprocess --input GLOB --tokenizer PATH --output DIR [options] [Beam options]``

Steps (each a labelled Beam transform):

1. The input globs are matched when the command starts (any Beam filesystem, ``gs://`` too: an
   empty glob fails before anything is written); ``MatchFiles`` / ``ReadMatches`` the files, cut
   each into byte ranges (``PlanRanges``; gzip/bzip2 files are one range) and ``ReadLines`` them
   as bytes, remembering file, range and line index (:mod:`pipelines.shards.textio`).
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
   (:mod:`pipelines.shards`).
6. ``WriteInfo``: ``info.json`` (checked against ``schemas/shard_info.json``), the spill files
   are removed, and ``COMPLETED`` is written last.

This module holds the job: plan, output folder, pipeline graph and command line; its settings are
in :mod:`pipelines.preprocess_config`, its counts in :mod:`pipelines.counters`, ``info.json`` in
:mod:`pipelines.preprocess_info`. Two entry points, as every job has:

- :func:`run_config` ``(PreprocessConfig, beam_args) -> PreprocessResult``: does the work and says
  how it ended (new, resumed, already complete, nothing new), with the committed version's
  ``info.json`` and folder; failures are exceptions.
- :func:`run` ``(argv) -> int``: the command line: parses, calls :func:`run_config`, prints what
  happened, and maps failures to the exit statuses of :mod:`kogpt2.jobs`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions

from kogpt2 import outputs, records
from kogpt2.flags import add_config_arguments, add_underscore_spellings, config_from_args, our_flags
from kogpt2.jobs import ExitStatus, run_main
from kogpt2.outputs import ALREADY_COMPLETE, INFO_FILE, RESUME, OutputRun
from kogpt2.records import TokenizerFacts
from kogpt2.storage import join, store_for
from pipelines.common import (
    check_beam_args,
    copy_file,
    create_pipeline,
    freeze_heap,
    frozen_heap,
    match_globs,
    pipeline_options,
    read_text,
)
from pipelines.preprocess_config import Plan, PreprocessConfig, Role, settings, shard_counts
from pipelines.preprocess_info import (
    CollectRun,
    WriteInfo,
    blocking_problems,
    failure_error,
)
from pipelines.preprocess_steps import CleanLines, Dedup, MakeExamples, Tokenize, open_tokenizer
from pipelines.shards.spill import SpillRuns, spill_prefix
from pipelines.shards.textio import REJECTED_FILE, ReadLines, plan_ranges
from pipelines.shards.writer import WriteShards

#: The job's name in manifests and locks.
JOB = "preprocess"


class NothingNewError(Exception):
    """Every input file was already preprocessed into one of the ``--exclude-inputs-of`` folders."""


def make_plan(config: PreprocessConfig) -> Plan:
    """Match the inputs (minus those of ``--exclude-inputs-of``) and read the tokenizer, before anything is written.

    Returns:
        The :class:`~pipelines.preprocess_config.Plan`: files with their sizes and times, the
        tokenizer's facts and file, the shard names, a run id.

    Raises:
        FileNotFoundError: a glob matches no file.
        kogpt2.tokenizer.TokenizerError: the tokenizer cannot be read.
        NothingNewError: every matched file was already preprocessed (``--exclude-inputs-of``).
        ValueError: an input file changed since a previous span read it.
    """
    stats = {path: list(stat) for path, stat in match_globs(config.inputs, flag="--input").items()}
    if config.exclude_inputs_of:
        done = inputs_of_spans(config.exclude_inputs_of)
        changed = [p for p in stats if p in done and done[p][0] != stats[p]]
        if changed:
            path = changed[0]
            raise ValueError(
                f"--input {path} changed since {done[path][1]} preprocessed it (size and time {done[path][0]}, now "
                f"{stats[path]}): files of an incremental corpus must not change. Move the new data to a new file, "
                "or rebuild the spans"
            )
        stats = {p: stat for p, stat in stats.items() if p not in done}
        if not stats:
            raise NothingNewError(
                f"nothing new: every file --input matches was already preprocessed into "
                f"{', '.join(sorted({where for _, where in done.values()}))}"
            )
    tok = open_tokenizer(config.tokenizer)
    counts = shard_counts(config, sum(stat[0] for stat in stats.values()))
    names = {s: tuple(records.shard_name(s, i, n) for i in range(n)) for s, n in counts.items()}
    return Plan(
        files=tuple(sorted(stats)),
        file_stats=stats,
        tokenizer=TokenizerFacts.of(tok),
        tokenizer_file=str(tok.path),
        tokenizer_name=tok.canonical_name,
        shard_names=names,
        run_id=uuid.uuid4().hex[:12],
    )


def inputs_of_spans(patterns: Sequence[str]) -> dict[str, tuple[list[int], str]]:
    """``path -> ([size, mtime], span folder)`` of every input file the complete shard folders matching ``patterns`` read.

    Raises:
        FileNotFoundError: a pattern matches no folder.
        outputs.NotCommittedError: a matched folder is not a complete shard folder.
    """
    out: dict[str, tuple[list[int], str]] = {}
    for folder in outputs.expand_folders(patterns, flag="--exclude-inputs-of"):
        done = outputs.open_committed(folder, job=JOB, verify="none")
        sig = done.manifest.signature
        for path in sig.get("files", []):
            out[path] = (list(sig.get("file_stats", {}).get(path, [])), folder)
    return out


def signature(config: PreprocessConfig, plan: Plan) -> dict[str, Any]:
    """What makes two runs the same run: the inputs as given and resolved, the tokenizer, every output-shaping flag.

    The flags are the settings of roles :data:`~pipelines.preprocess_config.Role.INPUT` and
    :data:`~pipelines.preprocess_config.Role.SHAPES` (``info.json`` records the latter too). The
    input files are named with their size and modification time, so a corpus edited in place
    (appended to, replaced) makes a different run.
    """
    return {
        "pipeline": "kogpt2.preprocess",
        "flags": settings(config, Role.INPUT, Role.SHAPES),
        "files": list(plan.files),
        "file_stats": {path: list(plan.file_stats[path]) for path in plan.files},
        "tokenizer": plan.tokenizer.to_json(),
    }


# --- the pipeline ----------------------------------------------------------------------


def build_pipeline(p: beam.Pipeline, config: PreprocessConfig, plan: Plan, run: OutputRun) -> beam.PCollection:
    """Add the preprocessing steps to ``p``.

    Args:
        p: a pipeline (or ``TestPipeline``).
        config: the run's configuration.
        plan: the resolved inputs and tokenizer (:func:`make_plan`).
        run: the run's claim on its output folder (:func:`kogpt2.outputs.begin`): files go to its
            work folder, and the last step commits them.

    Returns:
        A PCollection holding the one ``info.json`` document, once everything is written.
    """
    target = run.work
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
    stats = [lines.stats, cleaned.stats]
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
    writer = WriteShards(target, prefix, packing=config.packing, max_len=config.max_len, pad_id=plan.tokenizer.pad_id)
    every_file = p | "OutputFiles" >> beam.Create([(name, None) for name in plan.all_names], reshuffle=False)
    written = (
        (example_runs, rejected_runs, unread_runs, every_file)
        | "WithEveryFile" >> beam.Flatten()
        | "GroupRuns" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(writer, beam.pvalue.AsList(lines.line_counts))
    )
    return (
        [*stats, written]
        | "CountsAndShards" >> beam.Flatten()
        | "CollectRun" >> beam.CombineGlobally(CollectRun()).without_defaults()
        | "WriteInfo" >> beam.ParDo(WriteInfo(config, plan, run))
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
    """Parts a compressed input of ``size`` bytes is read in (:func:`pipelines.shards.textio.plan_ranges`).

    Locally: enough for every worker to have one, counting the other compressed files (2 workers
    and one ``.gz``: 2 parts; 2 workers and ten: 1). On other runners (``workers`` 0): one per
    64 MiB, at most 4. The shards do not depend on it.
    """
    if workers:
        return max(1, -(-workers // max(1, compressed)))
    return min(MAX_PARTS, max(1, math.ceil(size / COMPRESSED_PART_BYTES)))


def _plan_ranges(path: str, size: int, workers: int, compressed: int = 1) -> list[tuple[str, int, int]]:
    return plan_ranges(path, size, compressed_parts=compressed_parts(size, workers, compressed))


# --- the result ------------------------------------------------------------------------


class PreprocessStatus(Enum):
    """How a run ended when it did not fail."""

    #: a new version of the output folder is committed
    NEW = "new"
    #: an unfinished run with these settings was rebuilt in its work folder and committed
    RESUMED = "resumed"
    #: the current version is this very run (same inputs, tokenizer and flags): nothing written
    ALREADY_COMPLETE = "already complete"
    #: ``--exclude-inputs-of`` left no input file: no folder written
    NOTHING_NEW = "nothing new"


_STATUS_OF_ACTION = {
    outputs.NEW: PreprocessStatus.NEW,
    RESUME: PreprocessStatus.RESUMED,
    ALREADY_COMPLETE: PreprocessStatus.ALREADY_COMPLETE,
}


@dataclass(frozen=True)
class PreprocessResult:
    """What a preprocessing run did.

    Attributes:
        status: how it ended (:class:`PreprocessStatus`).
        output: the output folder.
        info: the ``info.json`` document of the committed version (None when nothing was new).
        version: the committed version's number (None when nothing was new).
        version_path: the committed version folder, a plain folder of shards (None when nothing was new).
        detail: why nothing was new (the span folders that read every input), else empty.
    """

    status: PreprocessStatus
    output: str
    info: Mapping[str, Any] | None = None
    version: int | None = None
    version_path: str | None = None
    detail: str = ""

    @property
    def counts(self) -> Mapping[str, Any]:
        """The ``counts`` block of ``info.json`` (empty when nothing was new)."""
        return self.info["counts"] if self.info is not None else {}

    def report(self) -> list[str]:
        """The lines ``python -m pipelines.preprocess`` prints."""
        if self.info is None:
            return [f"{self.detail}; no folder written"]
        lines = [summary_line(self.info)]
        if self.status is PreprocessStatus.ALREADY_COMPLETE:
            lines.insert(
                0,
                f"{self.output} is already complete: same inputs (sizes, modification times), tokenizer and flags; "
                "nothing to do (pass --overwrite to build a new version)",
            )
        else:
            lines.append(f"committed {self.output} version {self.version}: {self.version_path}")
        return lines


def committed_result(output: str, status: PreprocessStatus) -> PreprocessResult:
    """The result of a run whose version of ``output`` is the current one."""
    done = outputs.open_committed(output, job=JOB)
    info = dict(done.read_json(INFO_FILE))
    return PreprocessResult(status, output, info, done.manifest.version, done.root)


def summary_line(info: Mapping[str, Any]) -> str:
    """The one-line summary of an ``info.json``; names corrupt input files when there are any."""
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
            f"; WARNING: {len(corrupt)} corrupt or truncated input file(s) accepted (--allow-corrupt-input), read "
            f"only up to the damage: {', '.join(corrupt)} (see {info.get('rejected_file', REJECTED_FILE)})"
        )
    return line


# --- the job ---------------------------------------------------------------------------


def run_config(config: PreprocessConfig, beam_args: Sequence[str] = ()) -> PreprocessResult:
    """Run the preprocessing pipeline into a new version of ``config.output``, unless it already holds this run.

    Everything is validated (flags, globs, tokenizer, output folder) before the output folder is
    touched. The run holds the folder's lease (:class:`kogpt2.outputs.Lease`), builds in a work
    folder of its own and commits it with one manifest written last; the previous version stays
    readable until then, and stays current if the run fails.

    Args:
        config: the run's settings.
        beam_args: Beam pipeline options (``--runner``, ``--direct_num_workers``, ...).

    Returns:
        A :class:`PreprocessResult`: new, resumed, already complete or nothing new.

    Raises:
        ValueError: bad Beam options; an unreadable tokenizer; a changed input; an output over an input.
        FileNotFoundError: a glob matches no file.
        kogpt2.outputs.OutputConflictError: the output folder holds another run (no ``--overwrite``).
        kogpt2.outputs.OutputLockedError: another live run holds the output folder.
        EmptyOutputError / CorruptInputError: the data blocked the commit (nothing committed).
        RuntimeError: the pipeline finished without committing.
    """
    try:
        plan = make_plan(config)
    except NothingNewError as exc:
        return PreprocessResult(PreprocessStatus.NOTHING_NEW, config.output, detail=str(exc))
    outputs.refuse_output_over_inputs(config.output, [*plan.files, config.tokenizer, *config.exclude_inputs_of])
    options = pipeline_options(beam_args)
    with outputs.claimed(
        config.output,
        JOB,
        signature(config, plan),
        overwrite=config.overwrite,
        keep_versions=config.keep_versions,
        lease_seconds=config.lease_seconds,
        note=" (the current version stays readable until the new one commits)",
    ) as claim:
        status = _STATUS_OF_ACTION[claim.action]
        if status is PreprocessStatus.ALREADY_COMPLETE:
            return committed_result(config.output, status)
        prepare_work(plan, claim)
        p = create_pipeline(options)
        build_pipeline(p, config, plan, claim)
        with frozen_heap():
            p.run().wait_until_finish()
        current = outputs.read_manifest(config.output)
        if current is None or current[0].run_id != claim.run_id:
            raise uncommitted_error(config, claim)
        return committed_result(config.output, status)


def uncommitted_error(config: PreprocessConfig, run: OutputRun) -> Exception:
    """Why a run whose pipeline finished did not commit: its data (exit status 1), or a failure named in the log."""
    try:
        info = json.loads(read_text(join(run.work, INFO_FILE)))
    except Exception:  # noqa: BLE001 - no info.json: the pipeline stopped before it
        info = None
    if info is not None and blocking_problems(config, info["counts"]):
        return failure_error(config, info, run.work)
    return RuntimeError(f"the pipeline finished but did not commit {config.output} (see the log above)")


def prepare_work(plan: Plan, claim: OutputRun) -> None:
    """Make the run's work folder ready: emptied if an unfinished run of these inputs left files, the tokenizer copied in.

    The shards' tokenizer travels with them: ``kogpt2 train --model small`` finds it there.
    """
    store = store_for(claim.work)
    if claim.action == RESUME:  # nobody reads an uncommitted work folder: its partial files go
        store.delete_tree(join(claim.work, ""))
    store.makedirs(claim.work)
    copy_file(plan.tokenizer_file, join(claim.work, plan.tokenizer_name))


# --- command line ----------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """The parser of our flags, built from :class:`PreprocessConfig`'s fields; everything else goes to Beam."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.preprocess",
        description="Raw Korean text files -> gzip TFRecord shards + info.json (Apache Beam). "
        "Options not listed here are Beam pipeline options (--runner, --direct_num_workers, ...).",
        allow_abbrev=False,
    )
    add_config_arguments(p, PreprocessConfig, unset=True)
    add_underscore_spellings(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[PreprocessConfig, list[str]]:
    """Split ``argv`` into our config and Beam's arguments.

    Raises:
        ValueError: a missing or out-of-range flag, or an option neither ours nor Beam's.
        SystemExit: argparse's own errors (malformed flags).
    """
    parser = make_parser()
    args, beam_args = parser.parse_known_args(None if argv is None else list(argv))
    check_beam_args(beam_args, our_flags(parser))
    config: PreprocessConfig = config_from_args(PreprocessConfig, args)
    return config, beam_args


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.preprocess``: parse, :func:`run_config`, print what happened; return the exit status.

    Failures are reported on stderr and become the exit statuses of :mod:`kogpt2.jobs` (2: bad
    flags or a refused output folder, 1: the data blocked the commit, 3: locked, 5: anything
    else); nothing done and "nothing new" are 0.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)

    def body() -> int:
        result = run_config(*parse_args(argv))
        for line in result.report():
            print(line)
        return ExitStatus.DONE

    return run_main("preprocess", body)


#: The same entry under the name the scheduler scripts and the fault-matrix tests call.
main = run


if __name__ == "__main__":
    # Run the imported module, not __main__: Beam then pickles the DoFns by reference.
    from pipelines.preprocess import run as _run

    _code = _run()
    freeze_heap()  # the process ends next: its exit need not walk every object for cycles
    sys.exit(_code)
