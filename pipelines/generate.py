"""Bulk generation with Beam: seed words in, Parquet generations out, resumable.

    python -m pipelines.generate --model DIR --seeds PATH_OR_GLOB --output DIR \\
        [--greedy | --top-k K --top-p P --temperature T] [--num-samples N] [any Beam option]

The job's skeleton (the same as preprocessing's):

1. **parse and validate** every flag and input (seed globs, the model folder, the
   generation budget against the model's positions) before the output is touched;
2. **plan**: hash the weights and the tokenizer once, record the seed files' sizes;
3. **prepare the output**: refuse a folder that holds another run or overlaps an input;
   keep the committed units of an interrupted run with the same flags (a resume);
4. **build the pipeline**: read seeds (``.txt`` one per line, ``.csv`` / ``.jsonl`` /
   ``.parquet`` with ``--seed-column``) -> validate each (empty, undecodable or over-long
   seeds become dead letters with their reason) -> place every seed in a **work unit** of
   seeds of similar prompt length (:class:`~pipelines.generate_units.UnitLayout`; dead
   letters by a hash of their place) -> per unit, in one fused step: skip it if it is
   committed, else generate its rows in full length-bucketed batches, write its files and
   commit the unit by writing its record last -> one last step counts every unit, checks
   that no row is missing and writes ``info.json`` and ``COMPLETED``;
5. **report**: the launcher waits and prints the summary; it writes nothing the run needs,
   so a detached or templated Dataflow run leaves a finished folder too.

A unit is one output file: ``generations-UUUUU-of-NNNNN.parquet`` (rows sorted by seed,
sample index), beside ``rejected-UUUUU-of-NNNNN.jsonl`` when some of its seeds were
rejected, and ``failed-UUUUU-of-NNNNN.jsonl`` when a batch of its rows raised (the unit is
then not committed: the command exits 1 and a rerun redoes just those units).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from kogpt2 import outputs
from kogpt2.flags import add_config_arguments, given_values, read_config_file
from kogpt2.generation import GenerationConfig
from kogpt2.jobs import DataFailedError, ExitStatus, run_main
from kogpt2.outputs import ALREADY_COMPLETE, INFO_FILE, RESUME, OutputRun
from kogpt2.row_settings import DEFAULT_CONFIG, ROW_SETTINGS, SEED_ALIAS, NamedConfig, read_config_grid
from kogpt2.storage import join
from pipelines.common import (
    check_beam_args,
    create_pipeline,
    expand_globs,
    file_sizes,
    local_copy,
    pipeline_options,
    read_text,
    write_json,
)
from pipelines.generate_config import GenerateJob, GeneratePlan, RowCheck
from pipelines.generate_units import (
    FAILED_PATTERN,
    UNIT_LAYOUT,
    UNIT_PATTERN,
    GenerateUnits,
    KeptColumnTypes,
    UnitItem,
    UnitLayout,
    UnitStats,
    length_class,
    unit_of,
)
from pipelines.seeds import (
    ALL_COLUMNS,
    SeedRow,
    ValidateSeeds,
    column_types,
    csv_header,
    file_kind,
    read_seeds,
    template_fields,
)

log = logging.getLogger(__name__)

#: The run's full, resolved settings: ``--config job.json`` repeats it.
JOB_FILE = "job.json"
#: The job's name in manifests and locks.
JOB = "generate"
#: ``--dedup``'s side table of exact duplicate continuations.
DUPLICATES_FILE = "duplicates.parquet"


class RowsFailedError(DataFailedError):
    """Some rows failed (their units were not committed); a rerun of the same command redoes just those units."""


# -- 1. parse and validate -------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """Our flags, built from :class:`GenerateJob` and the strategy fields; ``--a-b`` also answers to ``--a_b``."""
    from kogpt2.flags import add_underscore_spellings
    from kogpt2.generation_config import add_generation_arguments

    p = argparse.ArgumentParser(
        prog="python -m pipelines.generate", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--config", metavar="FILE", help="settings from a JSON file (a run's job.json); flags override")
    add_config_arguments(p, GenerateJob, unset=True)
    add_generation_arguments(p)
    add_underscore_spellings(p)
    return p


def _is_folder(path: str) -> bool:
    """True when ``path`` holds a ``config.json`` (a model folder to read defaults from)."""
    return bool(FileSystems.exists(join(path, "config.json")))


def parse_args(argv: Sequence[str] | None = None) -> tuple[GenerateJob, list[str]]:
    """Split our flags from Beam's (``parse_known_args``) and validate them.

    Settings come from :class:`GenerateJob`'s defaults, then ``--config FILE``, then the flags.

    Raises:
        ValueError: an invalid flag value, or an option neither ours nor Beam's.
        FileNotFoundError: a ``--seeds`` pattern matches no file.
    """
    from kogpt2.flags import our_flags
    from kogpt2.generation_config import flag_layer

    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, beam_args = parser.parse_known_args(argv)
    check_beam_args(beam_args, our_flags(parser))
    job_fields = [f.name for f in dataclasses.fields(GenerateJob) if f.name != "config"]
    strategy_fields = [f.name for f in dataclasses.fields(GenerationConfig)]
    settings = read_config_file(args.config, job_fields + strategy_fields) if args.config else {}
    per_run = {f.name for f in dataclasses.fields(GenerateJob) if f.metadata.get("per_run")}
    for key in sorted(per_run & set(settings)):
        if settings[key]:
            raise ValueError(
                f"the --config file sets {key}={settings[key]!r}: --{key.replace('_', '-')} is decided for each run; "
                "give it on the command line"
            )
        del settings[key]
    job_settings = {k: v for k, v in settings.items() if k in job_fields}
    job_settings.update(given_values(args, job_fields))
    missing = [f"--{n}" for n in ("model", "seeds", "output") if n not in job_settings]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    model = job_settings["model"]
    if isinstance(job_settings["seeds"], str):
        job_settings["seeds"] = (job_settings["seeds"],)
    job_settings["seeds"] = tuple(expand_globs(job_settings["seeds"], flag="--seeds"))
    try:  # a training output folder: its committed version holds config.json and generation_config.json
        root = outputs.version_root(model, job="train")
    except outputs.NotCommittedError as exc:
        raise ValueError(f"--model {model}: {exc}") from None
    folder = local_copy(root) if _is_folder(root) else None
    config = GenerationConfig.from_layers(
        GenerationConfig.folder_layer(folder),
        {k: v for k, v in settings.items() if k in strategy_fields},
        flag_layer(args),
        names=("the model folder", "--config", "flags"),
    )
    return GenerateJob(**job_settings, config=config), beam_args


# -- 2. plan ---------------------------------------------------------------------------------


def make_plan(job: GenerateJob) -> GeneratePlan:
    """Resolve the model's limits and fingerprints; nothing is written.

    Raises:
        ValueError: the model folder is unusable, or ``max_new_tokens`` does not fit it.
    """
    from kogpt2.generation import max_prompt_tokens
    from kogpt2.model import model_fingerprint
    from kogpt2.tokenizer import load_tokenizer

    try:
        root = outputs.version_root(job.model, job="train")
    except outputs.NotCommittedError as exc:
        raise ValueError(f"--model {job.model}: {exc}") from None
    try:
        config_text = read_text(join(root, "config.json"))
    except OSError as exc:
        raise ValueError(f"--model {job.model}: no readable config.json ({exc})") from None
    try:
        model_config = json.loads(config_text)
        n_positions = int(model_config.get("n_positions") or model_config["max_position_embeddings"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"--model {job.model}: config.json has no n_positions (the model's context size); is it a GPT-2 folder?"
        ) from None
    limit = max_prompt_tokens(n_positions, job.config.max_new_tokens)
    folder = local_copy(job.model)
    try:
        model_fp = model_fingerprint(folder)
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {job.model}: {exc}") from None
    if job.configs:
        grid = tuple(read_config_grid(job.configs, job.config))
        for named in grid:
            max_prompt_tokens(n_positions, named.config.max_new_tokens)  # each configuration fits the model
    else:
        grid = (NamedConfig(DEFAULT_CONFIG, {}, job.config),)
    parquet_types = column_types(job.seeds)
    check_columns(job, parquet_types)
    return GeneratePlan(
        n_positions=n_positions,
        max_seed_tokens=min(job.max_seed_tokens, limit) if job.max_seed_tokens else limit,
        model_fingerprint=model_fp,
        tokenizer_fingerprint=tokenizer.fingerprint,
        seed_files=file_sizes(job.seeds),
        started=time.time(),
        grid=grid,
        parquet_types=parquet_types,
    )


def ids_may_repeat(job: GenerateJob, plan: GeneratePlan) -> bool:
    """Rows can share a ``row_id``: the ids come from ``--id-column``, or the seeds are not exactly
    the distinct files the plan listed (globs from a job built in code may match a file twice,
    and its ``file:line`` ids then repeat). The command line lists every glob's files once."""
    return bool(job.id_column) or len(set(job.seeds)) != len(job.seeds) or set(job.seeds) != set(plan.seed_files)


def check_columns(job: GenerateJob, parquet_types: dict[str, dict[str, str]]) -> None:
    """Refuse table files that lack a column the job names (``--seed-column``, ``--id-column``, ``--keep-columns``).

    JSON lines name their keys line by line: a line without one is a dead letter (seed, id) or a
    null (kept column) instead.

    Raises:
        ValueError: naming the file, the flag and the columns it has.
    """
    wanted = [("--seed-column", job.seed_column)]
    if job.id_column:
        wanted.append(("--id-column", job.id_column))
    wanted += [("--keep-columns", c) for c in job.keep_columns if c != ALL_COLUMNS]
    for path in job.seeds:
        kind = file_kind(path)
        if kind == "text":
            if job.keep_columns and job.keep_columns != (ALL_COLUMNS,) or job.id_column:
                raise ValueError(f"--seeds {path}: a .txt file has no columns (--keep-columns, --id-column)")
            continue
        if kind == "jsonl":
            continue
        columns = list(parquet_types[path]) if kind == "parquet" else csv_header(path)
        for flag_name, column in wanted:
            if column not in columns:
                raise ValueError(f"{flag_name} {column}: {path} has no such column (columns: {', '.join(columns)})")


def parquet_columns(job: GenerateJob) -> list[str] | None:
    """The Parquet columns the job reads (None: all of them, for ``--keep-columns '*'``)."""
    if job.keep_columns == (ALL_COLUMNS,):
        return None
    names = [job.seed_column, *([job.id_column] if job.id_column else []), *job.keep_columns, *ROW_SETTINGS, SEED_ALIAS]
    if job.prompt_template:
        names += template_fields(job.prompt_template)
    return list(dict.fromkeys(names))


def signature(job: GenerateJob, plan: GeneratePlan) -> dict[str, Any]:
    """What defines a run's output: a rerun with the same signature resumes into the folder."""
    return {
        "pipeline": "generate",
        "model_fingerprint": plan.model_fingerprint,
        "seeds": list(job.seeds),
        "seed_files": plan.seed_files,
        "seed_column": job.seed_column,
        "id_column": job.id_column,
        "keep_columns": list(job.keep_columns),
        "prompt_template": job.prompt_template,
        "configs": [{"name": c.name, **c.overrides} for c in plan.grid] if plan.partitioned else None,
        "config": job.config.describe(),
        "dtype": job.dtype,
        "batch_size": job.batch_size,  # near-tie tokens can flip with the batch shape
        "sampler": job.sampler,  # the same draw, but rounded differently: near ties can flip
        "attention": job.attention,  # likewise
        "num_shards": job.num_shards,
        "rows_per_file": job.rows_per_file,
        "max_seed_tokens": plan.max_seed_tokens,
        "unit_layout": UNIT_LAYOUT,  # which rows share a file: a folder of another layout is not resumed
    }


def num_units(rows: int, job: GenerateJob) -> int:
    """Work units: ``--num-shards``, else one per ``--rows-per-file`` output rows (all configurations)."""
    if job.num_shards:
        return job.num_shards
    return max(1, math.ceil(rows / job.rows_per_file))


def rows_of(row: SeedRow, job: GenerateJob, plan: GeneratePlan) -> int:
    """The output rows of one valid input row: its samples under every configuration."""
    from kogpt2.row_settings import effective

    return sum(
        effective(job.config, row.settings, named if plan.partitioned else None).num_samples for named in plan.grid
    )


# -- 4c. finalize (inside the pipeline) ------------------------------------------------------


def duplicate_counts(stats: Sequence[UnitStats], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Exact duplicate continuations per configuration, over the whole job (from every row's ``text_hash``)."""
    import numpy as np

    out = {}
    for name in names:
        arrays = [s.hashes[name] for s in stats if name in s.hashes and len(s.hashes[name])]
        hashes = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        _, counts = np.unique(hashes, return_counts=True)
        duplicates = int((counts - 1).sum())
        out[name] = {
            "rows": int(len(hashes)),
            "distinct": int(len(counts)),
            "duplicates": duplicates,
            "duplicate_rate": round(duplicates / len(hashes), 6) if len(hashes) else 0.0,
        }
    return out


def write_duplicates(work: str, files: Sequence[str], partitioned: bool, path: str) -> int:
    """``duplicates.parquet``: every row whose continuation an earlier row already has (row order: row_id,
    sample_index), with its group (``text_hash``) and the first row of the group. Nothing is dropped:
    a reader filters with a join (or ``DISTINCT ON``). Streams the unit files one at a time.

    Returns:
        Rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kogpt2.storage import store_for

    seen: dict[tuple[str, int], tuple[str, int]] = {}
    members: list[dict[str, Any]] = []
    keyed = []
    for rel in files:
        config = rel.split("/", 1)[0].split("=", 1)[1] if partitioned and "/" in rel else DEFAULT_CONFIG
        with store_for(join(work, rel)).open_read(join(work, rel)) as f:
            t = pq.read_table(f, columns=["row_id", "sample_index", "text_hash"])
        keyed += [(config, h, r, i) for r, i, h in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)]
    for config, h, r, i in sorted(keyed, key=lambda x: (x[0], x[2], x[3])):
        first = seen.setdefault((config, h), (r, i))
        if first != (r, i):
            members.append({"config": config, "row_id": r, "sample_index": i, "group": h,
                            "first_row_id": first[0], "first_sample_index": first[1]})  # fmt: skip
    schema = pa.schema(
        [("config", pa.string()), ("row_id", pa.string()), ("sample_index", pa.int32()), ("group", pa.int64()),
         ("first_row_id", pa.string()), ("first_sample_index", pa.int32())]
    )  # fmt: skip
    with store_for(path).open_write(path) as f:
        pq.write_table(pa.Table.from_pylist(members, schema=schema), f)
    return len(members)


def finalize(
    stats: list[UnitStats],
    seeds_in: int,
    units: int,
    unit_rows: dict[int, int],
    job: GenerateJob,
    plan: GeneratePlan,
    claim: OutputRun,
    repeated_ids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Count every unit, check that no row is missing, write ``info.json`` and ``job.json``, then commit.

    ``repeated_ids``: the row ids that more than one valid input row carries, with their counts
    (counted over the whole job: rows of one id can sit in different units).

    With failed rows, ``info.json`` (in the work folder) says so (``status: failed``) and nothing
    is committed: a rerun redoes the failed units.

    Raises:
        RuntimeError: a unit is missing, or rows do not add up (a bug: nothing may vanish).
    """
    import kogpt2
    from kogpt2.model import library_versions

    seen = sorted(s.unit for s in stats)
    if seen != list(range(units)):
        raise RuntimeError(f"expected units 0..{units - 1}, got {len(seen)} ({seen[:10]}...)")
    rejected_by: Counter[str] = Counter()
    for s in stats:
        rejected_by.update(s.rejected)
    rejected = sum(rejected_by.values())
    rows = sum(s.rows for s in stats)
    failed = sum(s.failed for s in stats)
    expected = sum(unit_rows.values())
    valid = sum(s.seeds for s in stats)
    if seeds_in != valid + rejected or expected != rows + failed:
        raise RuntimeError(
            f"rows went missing: {seeds_in} seeds in != {valid} valid + {rejected} rejected, or {expected} rows "
            f"planned != {rows} written + {failed} failed"
        )
    names = [named.name for named in plan.grid]
    tokens = sum(s.new_tokens for s in stats)
    eos = sum(s.eos for s in stats)
    fresh = [s for s in stats if not s.resumed]
    gen_seconds = sum(s.seconds for s in fresh)
    fresh_tokens = sum(s.new_tokens for s in fresh)
    wall = time.time() - plan.started
    status = "failed" if failed else "completed"
    done_units = [UNIT_PATTERN.format(unit=s.unit, units=units) for s in sorted(stats) if not s.failed]
    unit_files = outputs.unit_files(claim.work, done_units)
    parquet = sorted(f for f in unit_files if f.endswith(".parquet"))
    per_config: dict[str, dict[str, Any]] = {}
    for name in names:
        parts = [s.by_config[name] for s in stats if name in s.by_config]
        n = int(sum(p["rows"] for p in parts))
        per_config[name] = {
            "rows": n,
            "new_tokens": int(sum(p["new_tokens"] for p in parts)),
            "finish_eos": int(sum(p["eos"] for p in parts)),
            "logprob_mean": round(
                sum(p["logprob_sum"] for p in parts) / max(1, sum(p["new_tokens"] for p in parts)), 6
            ),
        }
    duplicates = duplicate_counts(stats, names) if not failed else {}
    for name, dup in duplicates.items():
        per_config[name].update(dup)
    repeated = repeated_ids or {}
    info: dict[str, Any] = {
        "created_by": f"kogpt2-pipeline {kogpt2.__version__}",
        "status": status,
        "model": job.model,
        "model_fingerprint": plan.model_fingerprint,
        "tokenizer_fingerprint": plan.tokenizer_fingerprint,
        "seeds": list(job.seeds),
        "config": job.config.describe(),
        "configs": {named.name: named.config.describe() for named in plan.grid} if plan.partitioned else None,
        "prompt_template": job.prompt_template,
        "batch_size": job.batch_size,
        "dtype": job.dtype,
        "counts": {
            "seeds_in": seeds_in,
            "seeds_valid": valid,
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(rejected_by.items())),
            "rows": rows,
            "failed_rows": failed,
            "finish_eos": eos,
            "finish_length": rows - eos,
            "duplicate_row_ids": sum(n - 1 for n in repeated.values()),
            "duplicate_row_id_examples": sorted(repeated)[:10],
            "duplicates": sum(d["duplicates"] for d in duplicates.values()) if duplicates else None,
        },
        "by_config": per_config,
        "units": {
            "total": units,
            "generated": sum(1 for s in fresh if not s.failed),
            "resumed": sum(1 for s in stats if s.resumed),
            "failed": sum(1 for s in stats if s.failed),
            "rows_per_file": job.rows_per_file if not job.num_shards else None,
        },
        "errors": sorted({s.error for s in stats if s.error})[:20],
        "new_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "generate_seconds": round(gen_seconds, 3),
        "tokens_per_second": round(fresh_tokens / wall, 2) if wall > 0 and fresh_tokens else None,
        "files": {
            "parquet": parquet,
            "rejected": sorted(f for f in unit_files if f.startswith("rejected-")),
            "failed": [FAILED_PATTERN.format(unit=s.unit, units=units) for s in sorted(stats) if s.failed],
            "duplicates": DUPLICATES_FILE if job.dedup and not failed else None,
        },
        "versions": library_versions(),
    }
    extra = []
    if job.dedup and not failed:
        info["counts"]["duplicates_listed"] = write_duplicates(
            claim.work, parquet, plan.partitioned, join(claim.work, DUPLICATES_FILE)
        )
        extra.append(DUPLICATES_FILE)
    write_json(join(claim.work, JOB_FILE), job.settings())
    write_json(join(claim.work, INFO_FILE), info)
    if not failed:
        summary = {"seeds_in": seeds_in, "rows": rows, "rejected": rejected, "new_tokens": tokens,
                   "duplicates": info["counts"]["duplicates"]}  # fmt: skip
        outputs.commit(claim, [*unit_files, *extra, JOB_FILE, INFO_FILE], summary=summary)
    return info


# -- 4. the pipeline -------------------------------------------------------------------------


def build_pipeline(
    p: beam.Pipeline, job: GenerateJob, plan: GeneratePlan, claim: OutputRun
) -> dict[str, beam.PCollection]:
    """Add the generation steps to ``p`` (its files go to ``claim``'s work folder; the last step commits).

    Returns:
        ``valid`` (:class:`SeedRow`), ``rejected`` (:class:`Rejected`), ``units`` (:class:`UnitStats`)
        and ``info`` (the ``info.json`` document, one element).
    """
    from apache_beam.pvalue import AsDict, AsList, AsSingleton

    records = read_seeds(p, job.seeds, parquet_columns(job))
    check = RowCheck(job.config, plan.grid, plan.n_positions, plan.max_seed_tokens)
    validate = ValidateSeeds(
        job.model,
        job.seed_column,
        plan.max_seed_tokens,
        id_column=job.id_column,
        keep=job.keep_columns,
        template=job.prompt_template,
        check_settings=check,
    )
    checked = records | "Validate" >> beam.ParDo(validate).with_outputs(ValidateSeeds.REJECTED, main="valid")
    valid, rejected = checked.valid, checked[ValidateSeeds.REJECTED]

    class_rows = (
        valid
        | "RowsOfEach" >> beam.Map(lambda r: (length_class(r.tokens), rows_of(r, job, plan)))
        | "RowsPerLength" >> beam.CombinePerKey(sum)
    )
    units = (
        class_rows
        | "Counts" >> beam.Values()
        | "CountRows" >> beam.CombineGlobally(sum)
        | "Units" >> beam.Map(num_units, job)
    )
    n_units = AsSingleton(units)
    layout = units | "Layout" >> beam.Map(lambda u, c: UnitLayout.of(c, u), c=AsDict(class_rows))
    keyed_rows = valid | "KeyRows" >> beam.Map(
        lambda r, lay: (lay.unit_of(r.row_id, length_class(r.tokens)), UnitItem(row=r)), lay=AsSingleton(layout)
    )
    if ids_may_repeat(job, plan):  # else every id is a distinct file:line: nothing to count (nor to hold in memory)
        repeated_ids = (
            valid
            | "Ids" >> beam.Map(lambda r: (r.row_id, 1))
            | "RowsPerId" >> beam.CombinePerKey(sum)
            | "Repeated" >> beam.Filter(lambda kv: kv[1] > 1)
        )
    else:
        repeated_ids = p | "NoRepeatedIds" >> beam.Create([])
    keyed_dead = rejected | "KeyDead" >> beam.Map(lambda r, u: (unit_of(r.key(), u), UnitItem(rejected=r)), u=n_units)
    markers = units | "EveryUnit" >> beam.FlatMap(lambda u: [(i, UnitItem()) for i in range(u)])
    unit_rows = (
        keyed_rows
        | "RowsPerUnit" >> beam.MapTuple(lambda u, item: (u, rows_of(item.row, job, plan)))
        | "SumRows" >> beam.CombinePerKey(sum)
    )
    kept = valid | "KeptColumnTypes" >> beam.CombineGlobally(KeptColumnTypes(plan.parquet_types, job.keep_columns))
    stats = (
        (keyed_rows, keyed_dead, markers)
        | "AllItems" >> beam.Flatten()
        | "ByUnit" >> beam.GroupByKey()
        | "GenerateUnits"
        >> beam.ParDo(
            GenerateUnits(job, plan, claim), units=n_units, unit_rows=AsDict(unit_rows), kept=AsSingleton(kept)
        )
    )
    seeds_in = records | "CountIn" >> beam.combiners.Count.Globally()
    info = (
        p
        | "Finish" >> beam.Create([None])
        | "Finalize"
        >> beam.Map(
            lambda _, st, si, u, ur, ri: finalize(st, si, u, ur, job, plan, claim, dict(ri)),
            st=AsList(stats),
            si=AsSingleton(seeds_in),
            u=n_units,
            ur=AsDict(unit_rows),
            ri=AsList(repeated_ids),
        )
    )
    return {"valid": valid, "rejected": rejected, "units": stats, "info": info}


# -- 3 and 5. prepare the output, run, report ------------------------------------------------


def _show_progress() -> None:
    """Make this module's INFO progress lines visible when nobody configured logging for them."""
    if log.getEffectiveLevel() > logging.INFO and not any(getattr(h, "_kogpt2_progress", False) for h in log.handlers):
        log.setLevel(logging.INFO)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._kogpt2_progress = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False


def summary_line(info: dict[str, Any], output: str) -> str:
    """One line a user reads at the end of a run."""
    c, u = info["counts"], info["units"]
    line = (
        f"{c['seeds_in']} seeds -> {c['rows']} rows ({c['rejected']} seeds rejected"
        f"{', ' + str(c['failed_rows']) + ' rows failed' if c['failed_rows'] else ''}), "
        f"{info['new_tokens']} tokens; {u['total']} files ({u['generated']} written now, {u['resumed']} kept "
        f"from an earlier run) in {info['wall_seconds']:.1f} s"
    )
    if info.get("tokens_per_second"):
        line += f" ({info['tokens_per_second']} tokens/s)"
    if c.get("duplicates") is not None:
        line += f"; {c['duplicates']} exact duplicate continuations"
    if c.get("duplicate_row_ids"):
        line += f"; WARNING: {c['duplicate_row_ids']} rows share a row_id with another (e.g. {c['duplicate_row_id_examples'][:3]})"
    return line + f"; output {output}"


class GenerateStatus(enum.StrEnum):
    """How a bulk generation run ended (a failed one raises instead)."""

    NEW = "new"  # a new version, committed
    RESUMED = "resumed"  # an unfinished run with these settings, continued and committed
    ALREADY_COMPLETE = "already complete"  # the current version is this very run: nothing generated


@dataclass(frozen=True)
class GenerateResult:
    """What a bulk generation run did.

    Attributes:
        status: how it ended.
        output: the output folder.
        info: the committed version's ``info.json`` (counts, per-configuration figures, files).
        version: the committed version's number.
        version_path: the committed version folder (Parquet files, ``config=NAME/`` with ``--configs``).
    """

    status: GenerateStatus
    output: str
    info: dict[str, Any]
    version: int
    version_path: str

    def report(self) -> list[str]:
        """The lines ``python -m pipelines.generate`` prints at the end."""
        line = summary_line(self.info, self.output)
        if self.status is GenerateStatus.ALREADY_COMPLETE:
            return [f"already complete (same model, seeds and flags): {line}"]
        return [line, f"committed {self.output} version {self.version}: {self.version_path}"]


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.generate``: parse, :func:`run_config`, print; the exit status (:mod:`kogpt2.jobs`)."""

    def body() -> int:
        from kogpt2.tf_setup import set_verbose

        _show_progress()
        job, beam_args = parse_args(argv)
        if job.verbose:
            set_verbose(True)
        for line in run_config(job, beam_args).report():
            log.info(line)
        return ExitStatus.DONE

    return run_main("pipelines.generate", body)


#: The command-line entry point (the same as :func:`run`).
main = run


def run_config(job: GenerateJob, beam_args: Sequence[str] = ()) -> GenerateResult:
    """Validate, plan, claim the output folder, run the pipeline; the pipeline commits the new version.

    Raises:
        ValueError / FileNotFoundError: bad flags or inputs (nothing was written).
        kogpt2.outputs.OutputConflictError: ``--output`` holds another run (use ``--overwrite``).
        kogpt2.outputs.OutputLockedError: another live run writes into ``--output``.
        RowsFailedError: some rows failed; the other units are committed in the work folder and a
            rerun redoes just the failed ones.
        RuntimeError: the pipeline failed, or rows went missing (the accounting check).
    """
    outputs.refuse_output_over_inputs(job.output, [job.model, *job.seeds])
    plan = make_plan(job)
    sig = signature(job, plan)
    options = pipeline_options(beam_args)
    with outputs.claimed(job.output, JOB, sig, overwrite=job.overwrite, keep_versions=job.keep_versions,
                         lease_seconds=job.lease_seconds) as claim:  # fmt: skip
        if claim.action == ALREADY_COMPLETE:
            return _result(job, GenerateStatus.ALREADY_COMPLETE)
        if claim.action == RESUME:
            log.info("resuming into %s: committed units are kept, the rest is generated", claim.work)
        log.info("generating from %d seed files into %s: %s", len(job.seeds), job.output, job.config.summary())
        p = create_pipeline(options)
        build_pipeline(p, job, plan, claim)
        pipeline_state = p.run().wait_until_finish()
        if str(pipeline_state).split(".")[-1] not in ("DONE", "None"):
            raise RuntimeError(f"pipeline ended in state {pipeline_state}")
        current = outputs.read_manifest(job.output)
        if current is not None and current[0].run_id == claim.run_id:
            return _result(job, GenerateStatus.RESUMED if claim.action == RESUME else GenerateStatus.NEW)
        info = json.loads(read_text(join(claim.work, INFO_FILE)))
    log.info(summary_line(info, job.output))
    raise RowsFailedError(
        f"{info['counts']['failed_rows']} rows failed (see {claim.work}/failed-*.jsonl; first error: "
        f"{(info['errors'] or ['?'])[0]}); nothing was committed. Rerun the same command to redo their units"
    )


def _result(job: GenerateJob, status: GenerateStatus) -> GenerateResult:
    done = outputs.open_committed(job.output, job=JOB)
    return GenerateResult(status, job.output, dict(done.read_json(INFO_FILE)), done.manifest.version, done.root)


if __name__ == "__main__":
    # Run the imported module, not __main__: Beam then pickles the DoFns by reference.
    from pipelines.generate import run as _run

    sys.exit(_run())
