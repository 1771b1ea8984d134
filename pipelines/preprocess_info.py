"""``info.json`` of a preprocessing run: counts gathered in the pipeline, checked, written last.

:class:`CollectRun` sums every step's counts (:mod:`pipelines.counters`) and lists the shards written; :class:`WriteInfo`
builds ``info.json`` (checked against ``schemas/shard_info.json``), removes the spill files and
commits the run's version (:mod:`kogpt2.outputs`), unless a split training needs came out empty or
an input was corrupt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam

import kogpt2
from kogpt2 import records
from kogpt2.jobs import DataFailedError
from kogpt2.outputs import INFO_FILE, OutputRun, commit
from kogpt2.schemas import validate_info
from kogpt2.storage import join
from pipelines.common import write_json
from pipelines.counters import REJECTED_BY_REASON, TOKENS, UNKS, Count, Counters, StepCounts
from pipelines.preprocess_config import Plan, PreprocessConfig, Role, settings
from pipelines.shards.spill import delete_spills
from pipelines.shards.textio import REJECTED_FILE
from pipelines.shards.writer import WrittenFile


class RunTally(NamedTuple):
    """What the pipeline gathered for ``info.json``: every step's counts summed, and the files written.

    Attributes:
        counts: each :class:`~pipelines.counters.Count` summed over the run (absent: 0).
        corrupt_inputs: the corrupt compressed input files, sorted.
        files: the shards and the rejected-lines file written, sorted by name.
    """

    counts: Counter[Count]
    corrupt_inputs: tuple[str, ...]
    files: tuple[WrittenFile, ...]


class CollectRun(beam.CombineFn):
    """Gather what ``info.json`` needs: :class:`~pipelines.counters.StepCounts` summed, written files listed.

    Output: one :class:`RunTally`.
    """

    def create_accumulator(self) -> RunTally:
        return RunTally(Counter(), (), ())

    def add_input(self, acc: RunTally, item: StepCounts | WrittenFile) -> RunTally:
        if isinstance(item, WrittenFile):
            return acc._replace(files=(*acc.files, item))
        acc.counts.update(item.counts)
        return acc._replace(corrupt_inputs=(*acc.corrupt_inputs, *item.corrupt_inputs))

    def merge_accumulators(self, accs: Iterable[RunTally]) -> RunTally:
        out = self.create_accumulator()
        for acc in accs:
            out.counts.update(acc.counts)
            out = out._replace(corrupt_inputs=out.corrupt_inputs + acc.corrupt_inputs, files=out.files + acc.files)
        return out

    def extract_output(self, acc: RunTally) -> RunTally:
        return RunTally(acc.counts, tuple(sorted(set(acc.corrupt_inputs))), tuple(sorted(acc.files)))


def summarize_counts(config: PreprocessConfig, tally: RunTally) -> dict[str, Any]:
    """The ``counts`` block of ``info.json`` from the summed step counts and the written shards.

    Every input line has one fate: ``rejected`` (by reason: ``undecodable``, ``too_long``),
    ``filtered`` by reason (``empty``, ``too_short``, ``duplicate``: with sentence splitting, a
    line is filtered when none of its sentences is kept) or ``kept``. A corrupt compressed file
    is not a line: its lines read before the damage have their own fates, and the file is listed
    in ``corrupt_inputs`` (one file-level dead letter each, ``line`` null).

    Raises:
        RuntimeError: the accounting does not add up (a bug, never a data problem).
    """
    s = tally.counts
    if config.dedup:
        kept = s[Count.DEDUP_KEPT_LINES] if config.split_sentences else s[Count.SENTENCES_UNIQUE]
        duplicate = s[Count.DEDUP_CANDIDATE_LINES] - kept
    else:
        kept, duplicate = s[Count.KEPT], 0
    filtered = {"empty": s[Count.FILTERED_EMPTY], "too_short": s[Count.FILTERED_TOO_SHORT], "duplicate": duplicate}
    examples = {split: sum(f.examples for f in tally.files if f.split == split) for split in records.SPLITS}
    tokens = {split: s[TOKENS[split]] for split in records.SPLITS}
    total_tokens = sum(tokens.values())
    unk = sum(s[UNKS[split]] for split in records.SPLITS)
    blocks = sum(examples.values())
    counts: dict[str, Any] = {
        "lines_read": s[Count.LINES_READ],
        "kept": kept,
        "filtered": filtered,
        "rejected": s[Count.REJECTED],
        "rejected_by_reason": {reason: s[count] for reason, count in REJECTED_BY_REASON.items()},
        "corrupt_inputs": list(tally.corrupt_inputs),
        "truncated": s[Count.TRUNCATED],
        "windowed": s[Count.WINDOWED],
        "examples": examples,
        "tokens": tokens,
        "unk_tokens": unk,
        "unk_rate": unk / total_tokens if total_tokens else 0.0,
        "packing_efficiency": records.packing_efficiency(total_tokens, blocks, config.max_len)
        if config.packing
        else None,
    }
    if config.split_sentences:
        unique = s[Count.SENTENCES_UNIQUE] if config.dedup else s[Count.SENTENCES_CANDIDATES]
        counts["sentences"] = {
            "split": s[Count.SENTENCES_SPLIT],
            "too_short": s[Count.SENTENCES_TOO_SHORT],
            "duplicate": s[Count.SENTENCES_CANDIDATES] - unique,
            "kept": unique,
        }
    accounted = kept + sum(filtered.values()) + counts["rejected"]
    if accounted != counts["lines_read"]:
        by_name = {count.value: n for count, n in sorted(s.items(), key=lambda kv: kv[0].value)}
        raise RuntimeError(
            f"accounting error: lines_read={counts['lines_read']} but kept+filtered+rejected={accounted}: {by_name}"
        )
    return counts


def data_fingerprint(files: Iterable[WrittenFile]) -> str:
    """The shards' fingerprint (:func:`kogpt2.records.data_fingerprint`) from the train and validation files written."""
    return records.data_fingerprint({f.name: f.sha256 for f in files if f.split in records.SPLITS})


def build_info(config: PreprocessConfig, plan: Plan, tally: RunTally) -> dict[str, Any]:
    """The ``info.json`` document (validated against ``schemas/shard_info.json``).

    It records every setting that shapes the examples (:data:`~pipelines.preprocess_config.Role.SHAPES`:
    the same the run's signature holds), the inputs and tokenizer as the plan resolved them, whether
    corrupt inputs were accepted, the counts and the shards.
    """
    info = {
        "schema_version": 1,
        "created_by": f"kogpt2-pipeline {kogpt2.__version__}",
        "data_fingerprint": data_fingerprint(tally.files),
        "fingerprint_method": records.FINGERPRINT_METHOD,
        "tokenizer": plan.tokenizer.to_json(),
        **settings(config, Role.SHAPES),
        "inputs": list(plan.files),
        "allow_corrupt_input": config.allow_corrupt_input,
        "counts": summarize_counts(config, tally),
        "shards": {split: list(plan.shard_names[split]) for split in records.SPLITS},
        "rejected_file": REJECTED_FILE,
    }
    validate_info(info)
    return info


class EmptyOutputError(DataFailedError):
    """A run ended with no example in a split training needs (and ``--allow-empty`` was not given)."""


class CorruptInputError(DataFailedError):
    """A compressed input was truncated or corrupt (and ``--allow-corrupt-input`` was not given)."""


def empty_splits(config: PreprocessConfig, counts: dict[str, Any]) -> list[str]:
    """The splits training needs that hold no example: ``train``, and ``validation`` when ``val_fraction > 0``."""
    needed = ["train", "validation"] if float(config.val_fraction) > 0 else ["train"]
    return [split for split in needed if not counts["examples"][split]]


def blocking_problems(config: PreprocessConfig, counts: dict[str, Any]) -> list[str]:
    """Why this run's output must not be committed (empty splits, corrupt inputs), or [] to commit it."""
    problems = []
    if empty_splits(config, counts) and not config.allow_empty:
        problems.append("empty")
    if counts.get("corrupt_inputs") and not config.allow_corrupt_input:
        problems.append("corrupt_input")
    return problems


def failure_error(config: PreprocessConfig, info: dict[str, Any], where: str) -> DataFailedError:
    """The error of a run that was not committed, with the counts that explain it."""
    c = info["counts"]
    kept = f"{config.output}'s current version (if any) is unchanged"
    if "empty" in blocking_problems(config, c):
        splits = " and ".join(empty_splits(config, c))
        return EmptyOutputError(
            f"no {splits} examples: of {c['lines_read']} lines read, {c['kept']} kept, filtered {c['filtered']}, "
            f"rejected {c['rejected']} {c.get('rejected_by_reason', {})}"
            + (f", corrupt input files {c['corrupt_inputs']}" if c.get("corrupt_inputs") else "")
            + f"; see {join(where, REJECTED_FILE)} (wrong --encoding? UTF-16 input?). Nothing was committed: {kept}; "
            "pass --allow-empty to accept an empty split"
        )
    return CorruptInputError(
        f"{len(c['corrupt_inputs'])} corrupt or truncated input file(s), read only up to the damage: "
        f"{', '.join(c['corrupt_inputs'])} (see {join(where, REJECTED_FILE)}). Nothing was committed: {kept}. "
        "Re-fetch the files and rerun, or pass --allow-corrupt-input to use what could be read"
    )


def status_summary(info: dict[str, Any]) -> dict[str, Any]:
    """The headline figures ``kogpt2 status`` shows for a shard folder."""
    c = info["counts"]
    return {
        "lines_read": c["lines_read"],
        "kept": c["kept"],
        "rejected": c["rejected"],
        "train_examples": c["examples"]["train"],
        "validation_examples": c["examples"]["validation"],
        "corrupt_inputs": len(c.get("corrupt_inputs") or []),
        "data_fingerprint": info["data_fingerprint"][:12],
    }


class WriteInfo(beam.DoFn):
    """Write ``info.json``, remove the spill files, then commit the run's version (its manifest last).

    A split training needs without examples, or a corrupt input, leaves the run uncommitted (unless
    ``allow_empty`` / ``allow_corrupt_input``): the output folder's current version stays, and the
    command exits with status 1 saying why (:func:`failure_error`).
    """

    def __init__(self, config: PreprocessConfig, plan: Plan, run: OutputRun):
        self.config = config
        self.plan = plan
        self.run = run

    def process(self, tally: RunTally) -> Iterator[dict[str, Any]]:
        info = build_info(self.config, self.plan, tally)
        counts = info["counts"]
        if self.config.dedup:  # known only now: the kept lines and the duplicates
            Counters().add({Count.KEPT: counts["kept"], Count.FILTERED_DUPLICATE: counts["filtered"]["duplicate"]})
        work = self.run.work
        write_json(join(work, INFO_FILE), info)
        delete_spills(work)
        if not blocking_problems(self.config, counts):
            files = [*self.plan.all_names, INFO_FILE, self.plan.tokenizer_name]
            commit(self.run, files, summary=status_summary(info))
        yield info
