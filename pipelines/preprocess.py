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

This module holds the job: plan, output folder, pipeline graph and command line; its settings are
in :mod:`pipelines.preprocess_config`, ``info.json`` in :mod:`pipelines.preprocess_info`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions

from kogpt2 import records
from kogpt2.flags import add_config_arguments, add_underscore_spellings, config_from_args, our_flags
from kogpt2.folders import COMPLETED_FILE, INFO_FILE, RUN_FILE
from pipelines.common import (
    OutputConflictError,
    check_beam_args,
    commit_staged,
    copy_file,
    create_pipeline,
    file_sizes,
    freeze_heap,
    frozen_heap,
    is_completed,
    join,
    list_folder,
    pipeline_options,
    read_text,
    remove_folder,
    remove_stale_staging,
    same_run,
    staging_folder,
    write_json,
)
from pipelines.counters import NAMESPACE as NAMESPACE  # re-exported
from pipelines.preprocess_config import (
    Plan,
    PreprocessConfig,
    shard_counts,
)
from pipelines.preprocess_info import (
    CollectRun,
    EmptyOutputError,
    WriteInfo,
    empty_output_message,
    empty_splits,
)
from pipelines.preprocess_steps import CleanLines, Dedup, MakeExamples, Tokenize, open_tokenizer
from pipelines.sorted_shards import SPILL_PREFIX as SPILL_PREFIX  # re-exported
from pipelines.sorted_shards import SpillRuns, WriteShards, spill_prefix
from pipelines.textio import REJECTED_FILE, ReadLines, match_files, plan_ranges


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
    same = same_run(
        folder, existing, sig, overwrite=overwrite, note=" (the old files stay readable until the new run finishes)"
    )
    if same and not overwrite and COMPLETED_FILE in {_name(p) for p in existing}:
        return ALREADY_COMPLETE
    return STAGE


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
            with frozen_heap():
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


def command(argv: Sequence[str] | None = None) -> int:
    """What ``python -m pipelines.preprocess`` runs: :func:`main`, then the heap frozen for the exit.

    The process ends next, so the interpreter's exit need not walk every object for cycles.
    """
    code = main(argv)
    freeze_heap()
    return code


if __name__ == "__main__":
    # Run the imported module, not __main__: Beam then pickles the DoFns by reference.
    from pipelines.preprocess import command as _command

    sys.exit(_command())
