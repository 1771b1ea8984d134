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
from collections.abc import Iterable
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from kogpt2 import outputs
from kogpt2.records import assign_shard, stable_hash
from kogpt2.storage import store_for
from pipelines.common import join, local_copy, write_text
from pipelines.generate_config import GenerateJob, GeneratePlan
from pipelines.seeds import NAMESPACE, Rejected

log = logging.getLogger("pipelines.generate")

PARQUET_PATTERN = "generations-{unit:05d}-of-{units:05d}.parquet"
REJECTED_PATTERN = "rejected-{unit:05d}-of-{units:05d}.jsonl"
FAILED_PATTERN = "failed-{unit:05d}-of-{units:05d}.jsonl"
UNIT_PATTERN = "{unit:05d}-of-{units:05d}"
#: Parquet footer key holding a unit's counts (the unit record holds them too).
UNIT_STATS_KEY = b"kogpt2.unit_stats"
ROW_GROUP_ROWS = 2048


def unit_of(key: str, units: int) -> int:
    """The work unit of a seed (or dead letter): a stable hash of its text, never the runner's order.

    The same hash and shard choice as preprocessing's (:func:`kogpt2.records.assign_shard`).
    """
    return assign_shard(stable_hash(key), units)


class UnitItem(NamedTuple):
    """What a work unit receives: a valid seed, a dead letter, or the marker that makes every unit exist."""

    seed: str | None = None
    rejected: Rejected | None = None


class UnitStats(NamedTuple):
    """A unit's counts (also stored in its Parquet footer, so a resumed run reads them back)."""

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

    def to_footer(self) -> bytes:
        return json.dumps(self._asdict(), sort_keys=True).encode("utf-8")

    @classmethod
    def from_footer(cls, data: bytes) -> UnitStats:
        return cls.from_record(json.loads(data))

    @classmethod
    def from_record(cls, meta: dict[str, Any]) -> UnitStats:
        """A committed unit's counts, from its record (:func:`kogpt2.outputs.read_unit`)."""
        return cls(**{**meta, "resumed": True})


def to_record(sample: Any, config: Any, model_fp: str, tokenizer_fp: str) -> dict[str, Any]:
    """A Parquet row (the columns of ``schemas/generations.json``)."""
    return {
        "seed": sample.prompt,
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
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tokenizer_fp,
    }


def write_parquet_atomic(path: str, records: list[dict[str, Any]], stats: UnitStats) -> None:
    """Write ``records`` (already ordered) as one Parquet file, atomically (a reader sees all of it or none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kogpt2.schemas import arrow_schema

    schema = arrow_schema().with_metadata({UNIT_STATS_KEY: stats.to_footer()})
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
                gen = Generator.from_folder(local_copy(job.model), dtype=job.dtype, batch_size=job.batch_size)
                log.info("loaded %s (%s) in %.1f s", job.model, job.dtype, time.perf_counter() - started)
                return gen

            tag = f"kogpt2-generator:{job.model}:{self._plan.model_fingerprint}:{job.dtype}:{job.batch_size}"
            if job.share_model_across_processes:
                from apache_beam.utils.multi_process_shared import MultiProcessShared

                self._model = MultiProcessShared(load, tag=tag, always_proxy=True).acquire()
            else:
                self._model = self._shared.acquire(load, tag=tag)
        return self._model

    def _outcomes(self, rows: list[tuple[str, int]]) -> Iterable[Any]:
        gen = self._generator()
        if self._job.share_model_across_processes:  # a proxy: lists cross processes, generators do not
            return gen.run_rows(rows, self._job.config)
        return gen.stream_rows(rows, self._job.config)

    def process(self, element: tuple[int, Iterable[UnitItem]], units: int, unit_rows: dict[int, int]):  # type: ignore[no-untyped-def]
        unit, items = element
        job, plan, work = self._job, self._plan, self._claim.work
        name = UNIT_PATTERN.format(unit=unit, units=units)
        final = join(work, PARQUET_PATTERN.format(unit=unit, units=units))
        committed = outputs.read_unit(work, name)
        if committed is not None:
            self._resumed.inc()
            yield UnitStats.from_record(committed)
            return
        outputs.renew_if_due(self._claim.lease)  # long jobs keep the folder's lease alive from the workers
        if self._progress is None:
            self._progress = Progress(work, units, unit_rows, job.progress_seconds)
        seeds: list[str] = []
        dead: list[Rejected] = []
        for item in items:
            if item.seed is not None:
                seeds.append(item.seed)
            elif item.rejected is not None:
                dead.append(item.rejected)
        seeds.sort()
        n = job.config.num_samples
        rows = [(s, i) for s in seeds for i in range(n)]
        started = time.perf_counter()
        samples: dict[tuple[str, int], Any] = {}
        failures: list[dict[str, Any]] = []
        new_tokens = 0
        if rows:
            try:
                for outcome in self._outcomes(rows):
                    if outcome.error is not None:
                        failures += [
                            {"seed": s, "sample_index": i, "reason": "inference_error", "detail": outcome.error}
                            for s, i in outcome.rows
                        ]
                        continue
                    samples.update(((s.prompt, s.sample_index), s) for s in outcome.samples)
                    new_tokens += outcome.new_tokens
                    self._progress.add(len(outcome.rows), outcome.new_tokens, outcome.seconds)
            except Exception as exc:  # noqa: BLE001 - the unit cannot be planned: every row is a dead letter
                log.warning("unit %d failed: %s: %s", unit, type(exc).__name__, exc)
                failed_keys = {(f["seed"], f["sample_index"]) for f in failures}
                failures += [
                    {
                        "seed": s,
                        "sample_index": i,
                        "reason": "inference_error",
                        "detail": f"{type(exc).__name__}: {exc}",
                    }
                    for s, i in dict.fromkeys(rows)
                    if (s, i) not in samples and (s, i) not in failed_keys
                ]
        seconds = time.perf_counter() - started
        rejected_by = dict(Counter(r.reason for r in dead))
        files = [PARQUET_PATTERN.format(unit=unit, units=units)]
        if dead:
            lines = sorted(r.to_json() for r in dead)
            files.append(REJECTED_PATTERN.format(unit=unit, units=units))
            write_text(join(work, files[-1]), "".join(line + "\n" for line in lines))
        failed_path = join(work, FAILED_PATTERN.format(unit=unit, units=units))
        if failures:
            # The unit is not committed, so none of its rows is written: the failing batches' rows
            # carry their error, the others say why they were held back. A rerun redoes the unit.
            failed_keys = {(f["seed"], f["sample_index"]) for f in failures}
            held = [
                {
                    "seed": s,
                    "sample_index": i,
                    "reason": "unit_not_committed",
                    "detail": "another batch of this unit failed; a rerun of the same command redoes the unit",
                }
                for s, i in dict.fromkeys(rows)
                if (s, i) not in failed_keys
            ]
            lines = sorted(json.dumps(f, ensure_ascii=False, sort_keys=True) for f in failures + held)
            write_text(failed_path, "".join(line + "\n" for line in lines))
            self._failed.inc(len(rows))
            self._progress.committed(len(rows))
            yield UnitStats(unit, len(seeds), 0, rejected_by, len(rows), 0, 0, seconds, False, failures[0]["detail"])
            return
        store_for(failed_path).delete(failed_path)  # an earlier attempt's, if any
        records = [to_record(samples[r], job.config, plan.model_fingerprint, plan.tokenizer_fingerprint) for r in rows]
        eos = sum(r["finish_reason"] == "eos" for r in records)
        tokens = sum(r["new_tokens"] for r in records)
        stats = UnitStats(unit, len(seeds), len(records), rejected_by, 0, tokens, eos, seconds, False)
        write_parquet_atomic(final, records, stats)
        meta = stats._asdict()
        meta.pop("resumed")
        outputs.commit_unit(work, name, files, meta, self._claim.lease)
        self._rows.inc(len(records))
        self._tokens.inc(new_tokens)
        self._units.inc()
        self._progress.committed(len(records))
        yield stats

    def teardown(self) -> None:
        if self._progress is not None and self._progress.pending == 0 and self._progress.tokens:
            self._progress.log(time.monotonic())
