"""Work units of bulk generation: each one generated, written and committed in one step.

A unit is one output file (and its dead letters), in the run's work folder. :class:`GenerateUnits`
skips a unit that is committed (its record in ``_units/`` names its files with sizes and CRC32C,
and they still match: :func:`kogpt2.outputs.read_unit`), or generates its rows in full
length-bucketed batches, writes its files (each one atomically) and commits the unit by writing
its record last (:func:`kogpt2.outputs.commit_unit`). No rename: on object storage a rename is a
copy and a delete, which is not a commit.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from kogpt2 import outputs
from kogpt2.generation import PROMPT_BUCKETS, prompt_bucket
from kogpt2.records import assign_shard, stable_hash
from kogpt2.storage import join, store_for
from pipelines.common import local_copy, write_text
from pipelines.generate_config import GenerateJob, GeneratePlan
from pipelines.seeds import NAMESPACE, Rejected, SeedRow

log = logging.getLogger("pipelines.generate")

PARQUET_PATTERN = "generations-{unit:05d}-of-{units:05d}.parquet"
REJECTED_PATTERN = "rejected-{unit:05d}-of-{units:05d}.jsonl"
FAILED_PATTERN = "failed-{unit:05d}-of-{units:05d}.jsonl"
UNIT_PATTERN = "{unit:05d}-of-{units:05d}"
#: How rows are placed in units (:class:`UnitLayout`); part of a run's signature, so a folder
#: laid out otherwise is never resumed into. It names the length classes
#: (:data:`kogpt2.generation.PROMPT_BUCKETS`): other buckets place rows in other units.
UNIT_LAYOUT = "prompt-length:" + ",".join(map(str, PROMPT_BUCKETS))
#: Hive-style partition folder of a configuration's files (``--configs``): DuckDB, Arrow and
#: BigQuery read ``config`` back as a column.
PARTITION = "config={name}"
#: Parquet footer key holding a unit's counts (the unit record holds them too).
UNIT_STATS_KEY = b"kogpt2.unit_stats"
ROW_GROUP_ROWS = 2048


def unit_of(key: str, units: int) -> int:
    """The work unit of a dead letter: a stable hash of its key, never the runner's order.

    The same hash and shard choice as preprocessing's (:func:`kogpt2.records.assign_shard`).
    Valid rows go by :class:`UnitLayout` instead.
    """
    return assign_shard(stable_hash(key), units)


def length_class(tokens: int) -> int:
    """A row's length class: the prompt-length bucket its ``tokens`` (``<s>`` included) fall in."""
    return prompt_bucket(tokens, PROMPT_BUCKETS[-1])


class UnitLayout(NamedTuple):
    """Which work unit each valid row goes to: rows of similar prompt length share units.

    The decoder pads a batch to its longest prompt's length bucket, so a unit ends every bucket
    it holds with a partial batch. Rows keyed by a plain hash put every bucket in every unit (up
    to 30 partial batches in 6 units of real seeds, 7% of the run); here the buckets share a
    unit only where one ends and the next begins, so a job has at most units + buckets - 1
    partial batches (10 there), about as few as one call over all the rows.

    The job's output rows are laid on a line by length class, shortest first, each class taking
    as much of the line as it has rows, and the line is cut into ``units`` equal stretches. A
    row's place within its class's part of the line is a stable hash of its ``row_id``, so the
    layout depends only on the input (the same on every rerun and runner), rows of one id and
    length share a unit, and units are balanced up to hash noise.

    Attributes:
        units: the number of work units.
        total: output rows of the job (every class's).
        spans: per length class, where its rows start on the line and how many there are.
    """

    units: int
    total: int
    spans: dict[int, tuple[int, int]]

    @classmethod
    def of(cls, class_rows: dict[int, int], units: int) -> UnitLayout:
        """The layout of a job with ``class_rows`` output rows per length class in ``units`` units."""
        spans, start = {}, 0
        for klass in sorted(class_rows):
            spans[klass] = (start, class_rows[klass])
            start += class_rows[klass]
        return cls(units, start, spans)

    def unit_of(self, row_id: str, klass: int) -> int:
        """The unit of a row of this length class (exact integer arithmetic: no float rounding)."""
        start, rows = self.spans[klass]
        h = int.from_bytes(stable_hash(row_id)[8:16], "big")  # uniform in [0, 2**64)
        return ((start << 64) + h * rows) * self.units // (self.total << 64)


def parquet_name(unit: int, units: int, config: str | None) -> str:
    """A unit's file of one configuration: ``[config=NAME/]generations-UUUUU-of-NNNNN.parquet``."""
    name = PARQUET_PATTERN.format(unit=unit, units=units)
    return f"{PARTITION.format(name=config)}/{name}" if config is not None else name


def text_hash(continuation: str) -> int:
    """A signed 64-bit hash of a continuation, normalized (NFKC, whitespace collapsed, trimmed).

    Two rows with the same ``text_hash`` are exact duplicates up to normalization: counted, and
    listed by ``--dedup``, never dropped.
    """
    import hashlib

    from kogpt2.text import normalize_text

    digest = hashlib.blake2b(normalize_text(continuation).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class UnitItem(NamedTuple):
    """What a work unit receives: a valid row, a dead letter, or the marker that makes every unit exist."""

    row: SeedRow | None = None
    rejected: Rejected | None = None


class UnitStats(NamedTuple):
    """A unit's counts (also in its record, so a resumed run reads them back without the rows).

    ``by_config`` holds per configuration ``rows``, ``new_tokens``, ``eos``, ``logprob_sum``;
    ``hashes`` the ``text_hash`` of every row per configuration (not stored: read back from the
    files of a resumed unit).
    """

    unit: int
    seeds: int
    rows: int
    rejected: dict[str, int]
    failed: int
    new_tokens: int
    eos: int
    seconds: float
    resumed: bool
    error: str | None = None
    by_config: dict[str, dict[str, float]] = {}
    hashes: dict[str, Any] = {}

    def to_record(self) -> dict[str, Any]:
        meta = self._asdict()
        for key in ("resumed", "hashes"):
            meta.pop(key)
        return meta

    def to_footer(self) -> bytes:
        return json.dumps(self.to_record(), sort_keys=True).encode("utf-8")

    @classmethod
    def from_footer(cls, data: bytes) -> UnitStats:
        return cls.from_record(json.loads(data))

    @classmethod
    def from_record(cls, meta: dict[str, Any], hashes: dict[str, Any] | None = None) -> UnitStats:
        """A committed unit's counts, from its record (:func:`kogpt2.outputs.read_unit`)."""
        return cls(**{**meta, "resumed": True, "hashes": hashes or {}})


def kept_value(value: Any, kind: str) -> Any:
    """An input value as its output column's type (``json``: non-text values as JSON text)."""
    if value is None:
        return None
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if kind == "float64" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def to_record(
    sample: Any,
    config: Any,
    row: SeedRow,
    kept: Sequence[tuple[str, str]],
    model_fp: str,
    tokenizer_fp: str,
) -> dict[str, Any]:
    """A Parquet row (the columns of ``schemas/generations.json``, then the kept input columns)."""
    out = {
        "row_id": row.row_id,
        "seed": row.seed,
        "prompt": row.prompt,
        "sample_index": sample.sample_index,
        "text": sample.text,
        "continuation": sample.continuation,
        "new_tokens": sample.new_tokens,
        "finish_reason": sample.finish_reason,
        "strategy": config.strategy,
        "temperature": float(config.temperature),
        "top_k": config.top_k,
        "top_p": float(config.top_p),
        "repetition_penalty": float(config.repetition_penalty),
        "no_repeat_ngram_size": config.no_repeat_ngram_size,
        "max_new_tokens": config.max_new_tokens,
        "row_seed": sample.row_seed,
        "logprob_sum": float(sample.logprob_sum),
        "logprob_mean": float(sample.logprob_mean),
        "text_hash": text_hash(sample.continuation),
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tokenizer_fp,
    }
    for name, kind in kept:
        out[name] = kept_value(row.columns.get(name), kind)
    return out


def output_schema(kept: Sequence[tuple[str, str]]) -> Any:
    """The Parquet schema of a job's files: ``schemas/generations.json``, then the kept columns (nullable)."""
    import pyarrow as pa

    from kogpt2.schemas import arrow_schema

    base = arrow_schema()
    extra = [pa.field(name, pa.string() if kind == "json" else _arrow_type(kind), nullable=True) for name, kind in kept]
    return pa.schema([*base, *extra], metadata=base.metadata)


def _arrow_type(kind: str) -> Any:
    import pyarrow as pa

    try:
        return pa.type_for_alias(kind)
    except ValueError:
        return pa.string()


class KeptColumnTypes(beam.CombineFn):
    """The output type of each kept column, from every valid row's values (and Parquet files' own types).

    A column keeps its Parquet type when every file that has it agrees; JSON and CSV values give
    ``bool``, ``int64``, ``float64`` or ``string``; ints and floats together give ``float64``; any
    other mix, or lists and objects, ``json`` (the value as JSON text).
    """

    def __init__(self, parquet_types: dict[str, dict[str, str]], names: Sequence[str]) -> None:
        self._parquet = parquet_types
        self._names = list(names)

    def create_accumulator(self) -> dict[str, set[str]]:
        return {}

    def add_input(self, acc: dict[str, set[str]], row: SeedRow) -> dict[str, set[str]]:
        declared = self._parquet.get(row.key[0])
        for name, value in row.columns.items():
            if value is None:
                acc.setdefault(name, set())
                continue
            if declared is not None and name in declared:
                kind = declared[name]
            elif isinstance(value, bool):
                kind = "bool"
            elif isinstance(value, int):
                kind = "int64"
            elif isinstance(value, float):
                kind = "float64"
            elif isinstance(value, str):
                kind = "string"
            else:
                kind = "json"
            acc.setdefault(name, set()).add(kind)
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, set[str]]]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for acc in accs:
            for name, kinds in acc.items():
                out.setdefault(name, set()).update(kinds)
        return out

    def extract_output(self, acc: dict[str, set[str]]) -> list[tuple[str, str]]:
        names = self._names if self._names != ["*"] else sorted(acc)
        out = []
        for name in names:
            kinds = acc.get(name, set())
            if len(kinds) == 1:
                kind = next(iter(kinds))
            elif kinds and kinds <= {"int64", "float64", "int32", "double", "float"}:
                kind = "float64"
            elif not kinds:
                kind = "string"
            else:
                kind = "json"
            out.append((name, kind))
        return out


def write_parquet_atomic(path: str, records: list[dict[str, Any]], stats: UnitStats, schema: Any) -> None:
    """Write ``records`` (already ordered) as one Parquet file, atomically (a reader sees all of it or none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = schema.with_metadata({**(schema.metadata or {}), UNIT_STATS_KEY: stats.to_footer()})
    with store_for(path).open_write(path) as f:
        with pq.ParquetWriter(f, schema) as writer:
            for start in range(0, max(len(records), 1), ROW_GROUP_ROWS):
                writer.write_table(pa.Table.from_pylist(records[start : start + ROW_GROUP_ROWS], schema=schema))


def read_unit_stats(path: str) -> UnitStats:
    """A unit file's counts, from its Parquet footer."""
    import pyarrow.parquet as pq

    with store_for(path).open_read(path) as f:
        metadata = pq.read_metadata(f).metadata or {}
    if UNIT_STATS_KEY not in metadata:
        raise ValueError(f"{path}: no {UNIT_STATS_KEY.decode()} in its footer; not written by this pipeline")
    return UnitStats.from_footer(metadata[UNIT_STATS_KEY])


class Progress:
    """Rows done out of the job's total, tokens/s and an ETA, logged every ``every`` seconds.

    Job-wide rows come from the units committed in the output folder (by any worker, or a
    previous run) plus this worker's rows not yet committed; the rate is measured over
    this worker's lifetime on that job-wide figure.
    """

    def __init__(self, output: str, units: int, unit_rows: dict[int, int], every: float) -> None:
        self.output, self.units, self.unit_rows, self.every = output, units, unit_rows, every
        self.total = sum(unit_rows.values())
        self.pending = 0  # this worker's rows generated but not committed
        self.tokens = 0
        self.gen_seconds = 0.0
        self.first: tuple[float, int] | None = None
        self.last_log = time.monotonic()

    def committed_rows(self) -> int:
        """Rows of the units committed so far (their records in the work folder), for the progress line."""
        done = 0
        try:
            names = store_for(self.output).children(join(self.output, outputs.UNITS_DIR))
        except OSError as exc:  # progress only: the next line tries again
            log.warning("progress: could not list the committed units (%s)", exc)
            return 0
        for name in names:
            if name.endswith(f"-of-{self.units:05d}.json"):
                done += self.unit_rows.get(int(name[:5]), 0)
        return done

    def add(self, rows: int, tokens: int, seconds: float) -> None:
        self.pending += rows
        self.tokens += tokens
        self.gen_seconds += seconds
        now = time.monotonic()
        if now - self.last_log >= self.every:
            self.last_log = now
            self.log(now)

    def log(self, now: float) -> None:
        done = min(self.committed_rows() + self.pending, self.total)
        if self.first is None:
            self.first = (now, done)
        t0, d0 = self.first
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        if done >= self.total:
            eta = "0 s"
        else:
            eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 else "unknown"
        log.info(
            "progress: %d of %d rows (%.1f%%), this worker %.0f tokens/s, ETA %s",
            done,
            self.total,
            100.0 * done / max(self.total, 1),
            self.tokens / max(self.gen_seconds, 1e-9),
            eta,
        )

    def committed(self, rows: int) -> None:
        self.pending = max(0, self.pending - rows)


class GenerateUnits(beam.DoFn):
    """``(unit, items)`` -> its files, committed by their record; yields its :class:`UnitStats`.

    A unit whose record exists and whose files still match it was committed by an earlier run
    (or attempt): its counts are read from the record and nothing is generated. The model is loaded on the
    first unit that needs it, once per process (``apache_beam.utils.shared``, as
    RunInference does) or once per machine (``--share-model-across-processes``).
    """

    def __init__(self, job: GenerateJob, plan: GeneratePlan, claim: outputs.OutputRun) -> None:
        from apache_beam.utils import shared

        self._job, self._plan, self._claim = job, plan, claim
        self._shared = shared.Shared()
        self._model: Any = None
        self._progress: Progress | None = None
        self._rows = Metrics.counter(NAMESPACE, "rows_generated")
        self._tokens = Metrics.counter(NAMESPACE, "new_tokens")
        self._failed = Metrics.counter(NAMESPACE, "rows_failed")
        self._units = Metrics.counter(NAMESPACE, "units_committed")
        self._resumed = Metrics.counter(NAMESPACE, "units_resumed")

    def _generator(self) -> Any:
        if self._model is None:
            job = self._job

            def load() -> Any:
                from kogpt2.generation import Generator

                started = time.perf_counter()
                gen = Generator.from_folder(
                    local_copy(job.model),
                    dtype=job.dtype,
                    batch_size=job.batch_size,
                    sampler=job.sampler,
                    attention=job.attention,
                )
                log.info(
                    "loaded %s (%s, %s attention) in %.1f s",
                    job.model,
                    job.dtype,
                    gen.decoder.attention,
                    time.perf_counter() - started,
                )
                return gen

            tag = (
                f"kogpt2-generator:{job.model}:{self._plan.model_fingerprint}:{job.dtype}:{job.batch_size}:"
                f"{job.sampler}:{job.attention}"
            )
            if job.share_model_across_processes:
                from apache_beam.utils.multi_process_shared import MultiProcessShared

                self._model = MultiProcessShared(load, tag=tag, always_proxy=True).acquire()
            else:
                self._model = self._shared.acquire(load, tag=tag)
        return self._model

    def _decode(self, rows: list[Any], config: Any) -> Iterable[Any]:
        gen = self._generator()
        if self._job.share_model_across_processes:  # a proxy: lists cross processes, generators do not
            return gen.run_rows(rows, config)
        return gen.stream_rows(rows, config)

    def _resumed_stats(self, unit: int, units: int, meta: dict[str, Any], work: str) -> UnitStats:
        """A committed unit's counts, and its rows' ``text_hash`` read back from its files (one column)."""
        import pyarrow.parquet as pq

        hashes: dict[str, Any] = {}
        for named in self._plan.grid:
            config = named.name if self._plan.partitioned else None
            path = join(work, parquet_name(unit, units, config))
            with store_for(path).open_read(path) as f:
                column = pq.read_table(f, columns=["text_hash"]).column("text_hash")
            hashes[named.name] = column.to_numpy(zero_copy_only=False)
        return UnitStats.from_record(meta, hashes)

    def process(self, element: tuple[int, Iterable[UnitItem]], units: int, unit_rows: dict[int, int], kept: Any):  # type: ignore[no-untyped-def]
        import numpy as np

        from kogpt2.generation import GenRow
        from kogpt2.row_settings import effective

        unit, items = element
        job, plan, work = self._job, self._plan, self._claim.work
        name = UNIT_PATTERN.format(unit=unit, units=units)
        committed = outputs.read_unit(work, name)
        if committed is not None:
            self._resumed.inc()
            yield self._resumed_stats(unit, units, committed, work)
            return
        outputs.renew_if_due(self._claim.lease)  # long jobs keep the folder's lease alive from the workers
        if self._progress is None:
            self._progress = Progress(work, units, unit_rows, job.progress_seconds)
        seed_rows: list[SeedRow] = []
        dead: list[Rejected] = []
        for item in items:
            if item.row is not None:
                seed_rows.append(item.row)
            elif item.rejected is not None:
                dead.append(item.rejected)
        seed_rows.sort(key=lambda r: r.key)
        # every row under every configuration, each with its own settings; decoded in groups of equal settings
        plan_rows: list[tuple[SeedRow, str, Any, int]] = []
        for row in seed_rows:
            for named in plan.grid:
                config = effective(job.config, row.settings, named if plan.partitioned else None)
                plan_rows += [(row, named.name, config, i) for i in range(config.num_samples)]
        # rows of any settings share full decode batches: each carries its own (GenRow), keyed by its position
        gen_rows = [GenRow(row.prompt, i, config, key=n) for n, (row, _, config, i) in enumerate(plan_rows)]
        started = time.perf_counter()
        samples: dict[int, Any] = {}
        failures: list[dict[str, Any]] = []
        failed_keys: set[int] = set()
        new_tokens = 0
        try:
            for outcome in self._decode(gen_rows, job.config):
                if outcome.error is not None:
                    failed_keys.update(r.key for r in outcome.rows)
                    failures.append({"detail": outcome.error, "rows": len(outcome.rows)})
                    continue
                samples.update((s.key, s) for s in outcome.samples)
                new_tokens += outcome.new_tokens
                self._progress.add(len(outcome.rows), outcome.new_tokens, outcome.seconds)
        except Exception as exc:  # noqa: BLE001 - the unit cannot be planned: every row is a dead letter
            log.warning("unit %d failed: %s: %s", unit, type(exc).__name__, exc)
            failures.append({"detail": f"{type(exc).__name__}: {exc}", "rows": len(plan_rows)})
        seconds = time.perf_counter() - started
        rejected_by = dict(Counter(r.reason for r in dead))
        files = []
        if dead:
            lines = sorted(r.to_json() for r in dead)
            files.append(REJECTED_PATTERN.format(unit=unit, units=units))
            write_text(join(work, files[-1]), "".join(line + "\n" for line in lines))
        failed_path = join(work, FAILED_PATTERN.format(unit=unit, units=units))
        missing = [n for n in range(len(plan_rows)) if n not in samples]
        if failures or missing:
            # The unit is not committed, so none of its rows is written: the failing batches' rows
            # carry their error, the others say why they were held back. A rerun redoes the unit.
            first = failures[0]["detail"] if failures else "rows without an outcome"
            letters = []
            for k, (r, cname, _, i) in enumerate(plan_rows):
                failed = k in failed_keys or k not in samples
                letters.append(
                    {
                        "row_id": r.row_id,
                        "seed": r.seed,
                        "config": cname,
                        "sample_index": i,
                        "reason": "inference_error" if failed else "unit_not_committed",
                        "detail": first
                        if failed
                        else "another batch of this unit failed; a rerun of the same command redoes the unit",
                    }
                )
            lines = sorted(json.dumps(f, ensure_ascii=False, sort_keys=True) for f in letters)
            write_text(failed_path, "".join(line + "\n" for line in lines))
            self._failed.inc(len(plan_rows))
            self._progress.committed(len(plan_rows))
            yield UnitStats(unit, len(seed_rows), 0, rejected_by, len(plan_rows), 0, 0, seconds, False, first)
            return
        store_for(failed_path).delete(failed_path)  # an earlier attempt's, if any
        by_config: dict[str, list[dict[str, Any]]] = {named.name: [] for named in plan.grid}
        for k, (row, cname, config, _) in enumerate(plan_rows):
            sample = samples[k]
            by_config[cname].append(
                to_record(sample, config, row, kept, plan.model_fingerprint, plan.tokenizer_fingerprint)
            )
        counts = {
            cname: {
                "rows": len(recs),
                "new_tokens": sum(r["new_tokens"] for r in recs),
                "eos": sum(r["finish_reason"] == "eos" for r in recs),
                "logprob_sum": float(sum(r["logprob_sum"] for r in recs)),
            }
            for cname, recs in by_config.items()
        }
        total = sum(c["rows"] for c in counts.values())
        tokens = sum(int(c["new_tokens"]) for c in counts.values())
        eos = sum(int(c["eos"]) for c in counts.values())
        hashes = {c: np.array([r["text_hash"] for r in recs], dtype=np.int64) for c, recs in by_config.items()}
        stats = UnitStats(
            unit, len(seed_rows), total, rejected_by, 0, tokens, eos, seconds, False, None, counts, hashes
        )
        schema = output_schema(kept)
        for cname, recs in by_config.items():
            rel = parquet_name(unit, units, cname if plan.partitioned else None)
            write_parquet_atomic(join(work, rel), recs, stats, schema)
            files.append(rel)
        outputs.commit_unit(work, name, files, stats.to_record(), self._claim.lease)
        self._rows.inc(total)
        self._tokens.inc(new_tokens)
        self._units.inc()
        self._progress.committed(total)
        yield stats

    def teardown(self) -> None:
        if self._progress is not None and self._progress.pending == 0 and self._progress.tokens:
            self._progress.log(time.monotonic())
