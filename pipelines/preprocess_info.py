"""``info.json`` of a preprocessing run: counts gathered in the pipeline, checked, written last.

:class:`CollectRun` sums every step's counts and lists the shards written; :class:`WriteInfo`
builds ``info.json`` (checked against ``schemas/shard_info.json``), removes the spill files and
commits the run's version (:mod:`kogpt2.outputs`), unless a split training needs came out empty or
an input was corrupt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

import kogpt2
from kogpt2 import records
from kogpt2.jobs import DataFailedError
from kogpt2.outputs import INFO_FILE, OutputRun, commit
from kogpt2.schemas import validate_info
from pipelines.common import join, write_json
from pipelines.counters import Counters
from pipelines.preprocess_config import (
    Plan,
    PreprocessConfig,
)
from pipelines.shards.spill import delete_spills
from pipelines.shards.textio import REJECT_REASONS, REJECTED_FILE


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
    return records.data_fingerprint({r["name"]: r["sha256"] for r in shards if r["split"] in records.SPLITS})


def build_info(
    config: PreprocessConfig, plan: Plan, stats: dict[str, int], shards: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``info.json`` document (validated against ``schemas/shard_info.json``)."""
    info = {
        "schema_version": 1,
        "created_by": f"kogpt2-pipeline {kogpt2.__version__}",
        "data_fingerprint": data_fingerprint(shards),
        "fingerprint_method": records.FINGERPRINT_METHOD,
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
        "allow_corrupt_input": config.allow_corrupt_input,
        "counts": summarize_counts(config, stats, shards),
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

    def process(self, collected: tuple[dict[str, int], list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        stats, shards = collected
        info = build_info(self.config, self.plan, stats, shards)
        counts = info["counts"]
        if self.config.dedup:
            Counters().add({"kept": counts["kept"], "filtered.duplicate": counts["filtered"]["duplicate"]})
        work = self.run.work
        write_json(join(work, INFO_FILE), info)
        delete_spills(work)
        if not blocking_problems(self.config, counts):
            files = [*self.plan.all_names, INFO_FILE, self.plan.tokenizer_file[1]]
            commit(self.run, files, summary=status_summary(info))
        yield info
