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
   seeds become dead letters with their reason) -> key every seed and dead letter by a
   stable hash into a **work unit** -> per unit, in one fused step: skip it if its file
   is committed, else generate its rows in full length-bucketed batches, write its Parquet
   file under a temporary name and rename it (the commit) -> one last step counts every
   unit, checks that no row is missing and writes ``info.json`` and ``COMPLETED``;
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
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from kogpt2.flags import add_config_arguments, given_values, read_config_file
from kogpt2.folders import COMPLETED_FILE, INFO_FILE, RUN_FILE
from kogpt2.generation import GenerationConfig
from pipelines.common import (
    TEMP_PREFIX,
    OutputConflictError,
    check_beam_args,
    create_pipeline,
    expand_globs,
    file_sizes,
    is_completed,
    join,
    list_folder,
    local_copy,
    pipeline_options,
    prepare_output,
    read_text,
    write_json,
    write_text,
)
from pipelines.generate_config import GenerateJob, GeneratePlan
from pipelines.generate_units import PARQUET_PATTERN, GenerateUnits, UnitItem, UnitStats, unit_of
from pipelines.seeds import ValidateSeeds, read_seeds

log = logging.getLogger(__name__)

#: The run's full, resolved settings: ``--config job.json`` repeats it.
JOB_FILE = "job.json"


# -- 1. parse and validate -------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """Our flags, built from :class:`GenerateJob` and the strategy fields; ``--a-b`` also answers to ``--a_b``."""
    from kogpt2.commands.generate import add_sampling_arguments
    from kogpt2.flags import add_underscore_spellings

    p = argparse.ArgumentParser(
        prog="python -m pipelines.generate", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--config", metavar="FILE", help="settings from a JSON file (a run's job.json); flags override")
    add_config_arguments(p, GenerateJob, unset=True)
    add_sampling_arguments(p)
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
    from kogpt2.commands.generate import config_from_args
    from kogpt2.flags import our_flags

    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, beam_args = parser.parse_known_args(argv)
    check_beam_args(beam_args, our_flags(parser))
    job_fields = [f.name for f in dataclasses.fields(GenerateJob) if f.name != "config"]
    strategy_fields = [f.name for f in dataclasses.fields(GenerationConfig)]
    settings = read_config_file(args.config, job_fields + strategy_fields) if args.config else {}
    job_settings = {k: v for k, v in settings.items() if k in job_fields}
    job_settings.update(given_values(args, job_fields))
    missing = [f"--{n}" for n in ("model", "seeds", "output") if n not in job_settings]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    model = job_settings["model"]
    if isinstance(job_settings["seeds"], str):
        job_settings["seeds"] = (job_settings["seeds"],)
    job_settings["seeds"] = tuple(expand_globs(job_settings["seeds"], flag="--seeds"))
    config = config_from_args(args, local_copy(model) if _is_folder(model) else None, settings)
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
        config_text = read_text(join(job.model, "config.json"))
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
    return GeneratePlan(
        n_positions=n_positions,
        max_seed_tokens=min(job.max_seed_tokens, limit) if job.max_seed_tokens else limit,
        model_fingerprint=model_fp,
        tokenizer_fingerprint=tokenizer.fingerprint,
        seed_files=file_sizes(job.seeds),
        started=time.time(),
    )


def signature(job: GenerateJob, plan: GeneratePlan) -> dict[str, Any]:
    """What defines a run's output: a rerun with the same signature resumes into the folder."""
    return {
        "pipeline": "generate",
        "model": job.model,
        "model_fingerprint": plan.model_fingerprint,
        "seeds": list(job.seeds),
        "seed_files": plan.seed_files,
        "seed_column": job.seed_column,
        "config": job.config.describe(),
        "dtype": job.dtype,
        "num_shards": job.num_shards,
        "rows_per_file": job.rows_per_file,
        "max_seed_tokens": plan.max_seed_tokens,
    }


def num_units(valid_seeds: int, job: GenerateJob) -> int:
    """Work units (= output files): ``--num-shards``, else one per ``--rows-per-file`` rows."""
    if job.num_shards:
        return job.num_shards
    return max(1, math.ceil(valid_seeds * job.config.num_samples / job.rows_per_file))


# -- 4c. finalize (inside the pipeline) ------------------------------------------------------


def finalize(stats: list[UnitStats], seeds_in: int, units: int, job: GenerateJob, plan: GeneratePlan) -> dict[str, Any]:
    """Count every unit, check that no row is missing, write ``info.json`` then ``COMPLETED``.

    With failed rows, ``info.json`` says so (``status: failed``) and ``COMPLETED`` is not
    written: a rerun redoes the failed units.

    Raises:
        RuntimeError: a unit is missing, or rows do not add up (a bug: nothing may vanish).
    """
    import kogpt2
    from kogpt2.model import library_versions

    seen = sorted(s.unit for s in stats)
    if seen != list(range(units)):
        raise RuntimeError(f"expected units 0..{units - 1}, got {len(seen)} ({seen[:10]}...)")
    n = job.config.num_samples
    rejected_by: Counter[str] = Counter()
    for s in stats:
        rejected_by.update(s.rejected)
    rejected = sum(rejected_by.values())
    rows = sum(s.rows for s in stats)
    failed = sum(s.failed for s in stats)
    if seeds_in * n != rows + rejected * n + failed:
        raise RuntimeError(
            f"rows went missing: {seeds_in} seeds x {n} samples != {rows} rows + {rejected} rejected x {n} "
            f"+ {failed} failed"
        )
    tokens = sum(s.new_tokens for s in stats)
    eos = sum(s.eos for s in stats)
    fresh = [s for s in stats if not s.resumed]
    gen_seconds = sum(s.seconds for s in fresh)
    fresh_tokens = sum(s.new_tokens for s in fresh)
    wall = time.time() - plan.started
    status = "failed" if failed else "completed"
    names = {p.rsplit("/", 1)[-1] for p in list_folder(job.output)}
    info = {
        "created_by": f"kogpt2-pipeline {kogpt2.__version__}",
        "status": status,
        "model": job.model,
        "model_fingerprint": plan.model_fingerprint,
        "tokenizer_fingerprint": plan.tokenizer_fingerprint,
        "seeds": list(job.seeds),
        "config": job.config.describe(),
        "batch_size": job.batch_size,
        "dtype": job.dtype,
        "counts": {
            "seeds_in": seeds_in,
            "seeds_valid": seeds_in - rejected,
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(rejected_by.items())),
            "rows": rows,
            "failed_rows": failed,
            "finish_eos": eos,
            "finish_length": rows - eos,
        },
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
            "parquet": [PARQUET_PATTERN.format(unit=s.unit, units=units) for s in sorted(stats) if not s.failed],
            "rejected": sorted(n for n in names if n.startswith("rejected-")),
            "failed": sorted(n for n in names if n.startswith("failed-")),
        },
        "versions": library_versions(),
    }
    leftovers = [join(job.output, n) for n in names if n.startswith(TEMP_PREFIX)]
    if leftovers:
        FileSystems.delete(leftovers)
    write_json(join(job.output, RUN_FILE), signature(job, plan))
    write_json(join(job.output, JOB_FILE), job.settings())
    write_json(join(job.output, INFO_FILE), info)
    if not failed:
        write_text(join(job.output, COMPLETED_FILE), "")
    return info


# -- 4. the pipeline -------------------------------------------------------------------------


def build_pipeline(p: beam.Pipeline, job: GenerateJob, plan: GeneratePlan) -> dict[str, beam.PCollection]:
    """Add the generation steps to ``p``.

    Returns:
        ``valid`` (seed strings), ``rejected`` (:class:`Rejected`), ``units`` (:class:`UnitStats`)
        and ``info`` (the ``info.json`` document, one element).
    """
    from apache_beam.pvalue import AsDict, AsList, AsSingleton

    raw = read_seeds(p, job.seeds, job.seed_column)
    checked = raw | "Validate" >> beam.ParDo(
        ValidateSeeds(job.model, job.seed_column, plan.max_seed_tokens)
    ).with_outputs(ValidateSeeds.REJECTED, main="valid")
    valid, rejected = checked.valid, checked[ValidateSeeds.REJECTED]

    units = valid | "CountValid" >> beam.combiners.Count.Globally() | "Units" >> beam.Map(num_units, job)
    n_units = AsSingleton(units)
    keyed_seeds = valid | "KeySeeds" >> beam.Map(lambda s, u: (unit_of(s, u), UnitItem(seed=s)), u=n_units)
    keyed_dead = rejected | "KeyDead" >> beam.Map(lambda r, u: (unit_of(r.key(), u), UnitItem(rejected=r)), u=n_units)
    markers = units | "EveryUnit" >> beam.FlatMap(lambda u: [(i, UnitItem()) for i in range(u)])
    samples = job.config.num_samples
    unit_rows = (
        keyed_seeds | "RowsPerUnit" >> beam.MapTuple(lambda u, _: (u, samples)) | "SumRows" >> beam.CombinePerKey(sum)
    )
    stats = (
        (keyed_seeds, keyed_dead, markers)
        | "AllItems" >> beam.Flatten()
        | "ByUnit" >> beam.GroupByKey()
        | "GenerateUnits" >> beam.ParDo(GenerateUnits(job, plan), units=n_units, unit_rows=AsDict(unit_rows))
    )
    seeds_in = raw | "CountIn" >> beam.combiners.Count.Globally()
    info = (
        p
        | "Finish" >> beam.Create([None])
        | "Finalize"
        >> beam.Map(
            lambda _, st, si, u: finalize(st, si, u, job, plan),
            st=AsList(stats),
            si=AsSingleton(seeds_in),
            u=n_units,
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
    return line + f"; output {output}"


def run(argv: Sequence[str] | None = None) -> int:
    """Validate, plan, prepare the output, run the pipeline and print its summary.

    Returns:
        0 when every row was written (``COMPLETED``), 1 when some rows failed (a rerun
        with the same flags redoes just their units).

    Raises:
        ValueError / FileNotFoundError: bad flags or inputs (nothing was written).
        OutputConflictError: ``--output`` holds another run (use ``--overwrite``).
        OutputLockedError: another live run writes into ``--output``.
        RuntimeError: the pipeline failed, or rows went missing (the accounting check).
    """
    from kogpt2.paths import FolderLock, refuse_output_over_inputs
    from kogpt2.tf_setup import set_verbose

    _show_progress()
    job, beam_args = parse_args(argv)
    if job.verbose:
        set_verbose(True)
    refuse_output_over_inputs(job.output, [job.model, *job.seeds])
    plan = make_plan(job)
    sig = signature(job, plan)
    options = pipeline_options(beam_args)
    local = FileSystems.get_scheme(job.output) in (None, "file")
    lock = FolderLock(job.output, job="pipelines.generate") if local else None
    if lock is not None:
        lock.acquire()
    try:
        state = prepare_output(job.output, sig, overwrite=job.overwrite, resume=True)
        if state == "resume" and is_completed(job.output):
            info = json.loads(read_text(join(job.output, INFO_FILE)))
            log.info("already complete (same model, seeds and flags): %s", summary_line(info, job.output))
            return 0
        if state == "resume":
            log.info("resuming into %s: committed files are kept, the rest is generated", job.output)
        log.info("generating from %d seed files into %s: %s", len(job.seeds), job.output, job.config.summary())
        p = create_pipeline(options)
        build_pipeline(p, job, plan)
        result = p.run()
        pipeline_state = result.wait_until_finish()
    finally:
        if lock is not None:
            lock.release()
    if str(pipeline_state).split(".")[-1] not in ("DONE", "None"):
        raise RuntimeError(f"pipeline ended in state {pipeline_state}")
    info = json.loads(read_text(join(job.output, INFO_FILE)))
    log.info(summary_line(info, job.output))
    if info["status"] != "completed":
        log.error(
            "%d rows failed (see %s/failed-*.jsonl; first error: %s); rerun the same command to redo their units",
            info["counts"]["failed_rows"],
            job.output,
            (info["errors"] or ["?"])[0],
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: bad flags and inputs print one line and exit with status 2."""
    from kogpt2.paths import OutputLockedError

    try:
        return run(argv)
    except (ValueError, FileNotFoundError, OutputConflictError, OutputLockedError) as exc:
        print(f"pipelines.generate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the imported module, not __main__: Beam then pickles the DoFns by reference.
    from pipelines.generate import main as _main

    sys.exit(_main())
