"""Bulk generation with Beam: seed words in, Parquet generations out.

    python -m pipelines.generate --model DIR --seeds PATH_OR_GLOB --output DIR \\
        [--greedy | --top-k K --top-p P --temperature T] [--num-samples N] [any Beam option]

Steps: read seeds (``.txt`` one per line, ``.csv`` / ``.jsonl`` / ``.parquet`` with
``--seed-column``) -> validate each seed (empty, undecodable or over-long seeds go to
``rejected-*.jsonl`` with their reason, before any batching) -> one row per (seed,
sample index) -> RunInference with :class:`GeneratorHandler` (the model is loaded once
per worker) -> rows sorted by (seed, sample_index) into Parquet shards chosen by a hash,
so a rerun with the same flags writes identical Parquet -> ``info.json`` -> ``COMPLETED``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from pipelines.common import (
    create_pipeline,
    expand_globs,
    join,
    local_copy,
    mark_completed,
    pipeline_options,
    prepare_output,
    read_text,
    write_json,
)

log = logging.getLogger(__name__)

NAMESPACE = "kogpt2_generate"
FORMATS = {".txt": "text", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
STATS_FILE = "_stats.json"
INFO_FILE = "info.json"
PARQUET_PATTERN = "generations-{shard:05d}-of-{num_shards:05d}.parquet"
REJECTED_PATTERN = "rejected-{shard:05d}-of-{num_shards:05d}.jsonl"


@dataclass(frozen=True)
class GenerateJob:
    """Our flags, validated (Beam's options are kept apart)."""

    model: str
    seeds: tuple[str, ...]
    output: str
    config: Any  # kogpt2.generation.GenerationConfig
    seed_column: str = "seed"
    batch_size: int = 64
    dtype: str = "float32"
    num_shards: int = 1
    max_seed_tokens: int = 0  # 0: the model's positions minus max_new_tokens
    share_model_across_processes: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        if self.max_seed_tokens < 0:
            raise ValueError(f"--max-seed-tokens={self.max_seed_tokens}: must be >= 0 (0 = the model's limit)")
        for path in self.seeds:
            if os.path.splitext(path)[1].lower() not in FORMATS:
                raise ValueError(f"--seeds file {path}: unknown format; use one of {sorted(FORMATS)}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[GenerateJob, list[str]]:
    """Split our flags from Beam's (``parse_known_args``) and validate them.

    Raises:
        ValueError: an invalid flag value.
        FileNotFoundError: a ``--seeds`` pattern matches no file.
    """
    from kogpt2.commands.generate import add_sampling_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder")
    parser.add_argument("--seeds", action="append", required=True, metavar="GLOB", help="seed files (repeatable)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (local or gs://)")
    parser.add_argument("--seed-column", default="seed", help="column / key of .csv, .jsonl, .parquet seeds")
    parser.add_argument("--num-shards", type=int, default=1, help="Parquet files to write (default 1)")
    parser.add_argument("--max-seed-tokens", type=int, default=0, help="reject longer seeds (0 = model limit)")
    parser.add_argument(
        "--share-model-across-processes",
        action="store_true",
        help="one model per machine shared by all worker processes (big models)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a different run's files in --output")
    add_sampling_arguments(parser)
    args, beam_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    job = GenerateJob(
        model=args.model,
        seeds=tuple(expand_globs(args.seeds)),
        output=args.output,
        config=config_from_args(args),
        seed_column=args.seed_column,
        batch_size=args.batch_size,
        dtype=args.dtype,
        num_shards=args.num_shards,
        max_seed_tokens=args.max_seed_tokens,
        share_model_across_processes=args.share_model_across_processes,
        overwrite=args.overwrite,
    )
    return job, beam_args


# -- reading and validating seeds ---------------------------------------------------------


class ParseCsv(beam.DoFn):
    """A whole CSV file -> ``(path, value)`` per row; bytes that are not UTF-8 survive as surrogates."""

    def __init__(self, column: str) -> None:
        self._column = column

    def process(self, readable: Any) -> Iterable[tuple[str, Any]]:
        path = readable.metadata.path
        text = readable.read().decode("utf-8-sig", errors="surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or self._column not in reader.fieldnames:
            raise ValueError(f"{path}: no column {self._column!r} (columns: {reader.fieldnames}); see --seed-column")
        for row in reader:
            yield path, row[self._column]


def _decode(raw: Any) -> tuple[str | None, str]:
    """(text, reason); text is None when the value cannot be a seed."""
    if raw is None:
        return None, "empty"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"undecodable: {exc.reason} at byte {exc.start}"
    if not isinstance(raw, str):
        return None, f"bad_record: a {type(raw).__name__}, not text"
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return None, "undecodable: not valid UTF-8"
    return raw.lstrip("\ufeff").rstrip("\r\n"), ""


class ValidateSeeds(beam.DoFn):
    """``(kind, path, raw)`` -> a valid seed string, or a ``rejected`` record with its reason."""

    REJECTED = "rejected"

    def __init__(self, model_dir: str, column: str, max_tokens: int) -> None:
        self._model_dir = model_dir
        self._column = column
        self._max_tokens = max_tokens
        self._tokenizer: Any = None
        self._read = Metrics.counter(NAMESPACE, "seeds_read")
        self._valid = Metrics.counter(NAMESPACE, "seeds_valid")
        self._rejected = Metrics.counter(NAMESPACE, "seeds_rejected")

    def setup(self) -> None:
        from kogpt2.tokenizer import load_tokenizer

        self._tokenizer = load_tokenizer(local_copy(self._model_dir))

    def _reject(self, path: str, raw: Any, reason: str) -> beam.pvalue.TaggedOutput:
        self._rejected.inc()
        Metrics.counter(NAMESPACE, f"rejected_{reason.split(':')[0]}").inc()
        if isinstance(raw, bytes):
            shown = raw.decode("utf-8", errors="backslashreplace")
        elif isinstance(raw, str):
            shown = raw.encode("utf-8", errors="backslashreplace").decode("utf-8")
        else:
            shown = None if raw is None else repr(raw)
        record = {"source": path, "seed": shown, "reason": reason.split(":")[0], "detail": reason}
        return beam.pvalue.TaggedOutput(self.REJECTED, record)

    def process(self, element: tuple[str, str, Any]) -> Iterable[Any]:
        kind, path, raw = element
        self._read.inc()
        if kind == "jsonl":
            text, reason = _decode(raw)
            if text is None:
                yield self._reject(path, raw, reason)
                return
            if not text.strip():
                yield self._reject(path, raw, "empty")
                return
            try:
                obj = json.loads(text)
            except ValueError as exc:
                yield self._reject(path, raw, f"bad_record: not JSON ({exc})")
                return
            if not isinstance(obj, dict) or self._column not in obj:
                yield self._reject(path, raw, f"bad_record: no key {self._column!r}")
                return
            raw = obj[self._column]
        seed, reason = _decode(raw)
        if seed is None:
            yield self._reject(path, raw, reason)
        elif not seed.strip():
            yield self._reject(path, raw, "empty")
        else:
            n = 1 + len(self._tokenizer.encode(seed))  # <s> + the seed
            if n > self._max_tokens:
                yield self._reject(path, seed, f"too_long: {n} tokens > {self._max_tokens}")
            else:
                self._valid.inc()
                yield seed


def read_seeds(p: beam.Pipeline, job: GenerateJob) -> beam.PCollection:
    """All seed records as ``(kind, path, raw value)``, through Beam IO, per file format."""
    from apache_beam.io import fileio
    from apache_beam.io.parquetio import ReadAllFromParquet
    from apache_beam.io.textio import ReadAllFromText

    by_kind: dict[str, list[str]] = {}
    for path in job.seeds:
        by_kind.setdefault(FORMATS[os.path.splitext(path)[1].lower()], []).append(path)
    parts = []
    for kind, files in sorted(by_kind.items()):
        listed = p | f"List{kind}" >> beam.Create(files)
        if kind in ("text", "jsonl"):
            lines = listed | f"Read{kind}" >> ReadAllFromText(coder=beam.coders.BytesCoder(), with_filename=True)
            parts.append(lines | f"Tag{kind}" >> beam.MapTuple(lambda path, line, k=kind: (k, path, line)))
        elif kind == "csv":
            rows = listed | "MatchCsv" >> fileio.MatchAll() | "OpenCsv" >> fileio.ReadMatches()
            rows = rows | "ParseCsv" >> beam.ParDo(ParseCsv(job.seed_column))
            parts.append(rows | "Tagcsv" >> beam.MapTuple(lambda path, v: ("value", path, v)))
        else:
            col = job.seed_column
            recs = listed | "ReadParquet" >> ReadAllFromParquet(columns=[col], with_filename=True)
            parts.append(recs | "Tagparquet" >> beam.MapTuple(lambda path, r, c=col: ("value", path, r.get(c))))
    return parts | "AllSeeds" >> beam.Flatten()


# -- inference -----------------------------------------------------------------------------


class GeneratorHandler(ModelHandler):
    """RunInference handler: examples ``(seed, sample_index)`` -> :class:`~kogpt2.generation.Sample`.

    The model folder is loaded once per worker (or once per machine with
    ``share_model_across_processes``); RunInference batches ``batch_size`` rows.
    """

    def __init__(self, model_dir: str, config: Any, *, batch_size: int, dtype: str, share: bool = False) -> None:
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._model_dir = model_dir
        self._config = config
        self._batch_size = batch_size
        self._dtype = dtype
        self._share = share

    def load_model(self) -> Any:
        from kogpt2.generation import Generator

        started = time.perf_counter()
        folder = local_copy(self._model_dir)
        gen = Generator.from_folder(folder, dtype=self._dtype, batch_size=self._batch_size)
        log.info("loaded %s (%s) in %.1f s", self._model_dir, self._dtype, time.perf_counter() - started)
        return gen

    def run_inference(
        self, batch: Sequence[tuple[str, int]], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        started = time.perf_counter()
        samples = model.generate_rows(list(batch), self._config)
        seconds = time.perf_counter() - started
        tokens = sum(s.new_tokens for s in samples)
        Metrics.counter(NAMESPACE, "rows_generated").inc(len(samples))
        Metrics.counter(NAMESPACE, "new_tokens").inc(tokens)
        Metrics.counter(NAMESPACE, "generate_ms").inc(int(seconds * 1000))
        log.info(
            "generated %d rows, %d tokens in %.1f s (%.0f tokens/s)",
            len(samples),
            tokens,
            seconds,
            tokens / max(seconds, 1e-9),
        )
        return [PredictionResult(example, sample) for example, sample in zip(batch, samples, strict=True)]

    def get_num_bytes(self, batch: Sequence[tuple[str, int]]) -> int:
        return sum(len(seed.encode("utf-8")) for seed, _ in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def share_model_across_processes(self) -> bool:
        return self._share


# -- writing -------------------------------------------------------------------------------


def shard_of(seed: str, sample_index: int, num_shards: int) -> int:
    """The output shard of a row: a stable hash of its ids (never the runner's order)."""
    digest = hashlib.sha256(f"{seed}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def to_record(result: PredictionResult, config: Any, model_fp: str, tokenizer_fp: str) -> dict[str, Any]:
    """A Parquet row (the columns of ``schemas/generations.json``)."""
    s = result.inference
    return {
        "seed": s.prompt,
        "sample_index": s.sample_index,
        "text": s.text,
        "continuation": s.continuation,
        "new_tokens": s.new_tokens,
        "finish_reason": s.finish_reason,
        "strategy": config.strategy,
        "temperature": float(config.temperature),
        "top_k": config.top_k,
        "top_p": float(config.top_p),
        "repetition_penalty": float(config.repetition_penalty),
        "no_repeat_ngram_size": config.no_repeat_ngram_size,
        "max_new_tokens": config.max_new_tokens,
        "row_seed": s.row_seed,
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tokenizer_fp,
    }


class WriteShard(beam.DoFn):
    """``(shard, records)`` -> one file, records sorted; yields its stats. Writes empty shards too."""

    def __init__(self, output: str, pattern: str, num_shards: int, fmt: str) -> None:
        self._output, self._pattern, self._num_shards, self._fmt = output, pattern, num_shards, fmt

    def process(self, element: tuple[int, Iterable[Any]]) -> Iterable[dict[str, Any]]:
        shard, items = element
        records = [r for r in items if r is not None]  # None: the marker that makes empty shards exist
        path = join(self._output, self._pattern.format(shard=shard, num_shards=self._num_shards))
        if self._fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            from kogpt2.schemas import arrow_schema

            records.sort(key=lambda r: (r["seed"], r["sample_index"]))
            table = pa.Table.from_pylist(records, schema=arrow_schema())
            with FileSystems.create(path) as f:
                pq.write_table(table, f)
            yield {
                "kind": "parquet",
                "file": path,
                "rows": len(records),
                "new_tokens": sum(r["new_tokens"] for r in records),
                "eos": sum(r["finish_reason"] == "eos" for r in records),
            }
        else:
            lines = sorted(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records)
            with FileSystems.create(path) as f:
                f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            yield {"kind": "rejected", "file": path, "rows": len(records)}


def write_sharded(
    pcoll: beam.PCollection, label: str, shard_fn: Any, job: GenerateJob, pattern: str, num_shards: int, fmt: str
) -> beam.PCollection:
    """Group records into ``num_shards`` files (every shard written, even empty)."""
    markers = pcoll.pipeline | f"{label}Shards" >> beam.Create([(i, None) for i in range(num_shards)])
    keyed = pcoll | f"{label}Key" >> beam.Map(lambda r: (shard_fn(r), r))
    grouped = (keyed, markers) | f"{label}Merge" >> beam.Flatten() | f"{label}Group" >> beam.GroupByKey()
    return grouped | f"{label}Write" >> beam.ParDo(WriteShard(job.output, pattern, num_shards, fmt))


def build_pipeline(p: beam.Pipeline, job: GenerateJob) -> dict[str, beam.PCollection]:
    """Add the generation steps to ``p``.

    Returns:
        ``records`` (Parquet rows), ``rejected`` (dead letters) and ``stats`` (one dict).
    """
    from kogpt2.generation import max_prompt_tokens
    from kogpt2.model import model_fingerprint
    from kogpt2.tokenizer import load_tokenizer

    config = job.config
    n_positions = int(json.loads(read_text(join(job.model, "config.json")))["n_positions"])
    limit = max_prompt_tokens(n_positions, config.max_new_tokens)
    max_tokens = min(job.max_seed_tokens, limit) if job.max_seed_tokens else limit
    model_fp = model_fingerprint(local_copy(job.model))
    tokenizer_fp = load_tokenizer(local_copy(job.model)).fingerprint
    handler = GeneratorHandler(
        job.model, config, batch_size=job.batch_size, dtype=job.dtype, share=job.share_model_across_processes
    )

    raw = read_seeds(p, job)
    checked = raw | "Validate" >> beam.ParDo(ValidateSeeds(job.model, job.seed_column, max_tokens)).with_outputs(
        ValidateSeeds.REJECTED, main="valid"
    )
    rows = (
        checked.valid
        | "Samples" >> beam.FlatMap(lambda seed, n=config.num_samples: [(seed, i) for i in range(n)])
        | "Spread" >> beam.Reshuffle()
    )
    records = (
        rows | "Generate" >> RunInference(handler) | "ToRecord" >> beam.Map(to_record, config, model_fp, tokenizer_fp)
    )
    n = job.num_shards
    written = write_sharded(
        records, "Parquet", lambda r: shard_of(r["seed"], r["sample_index"], n), job, PARQUET_PATTERN, n, "parquet"
    )
    dead = write_sharded(checked.rejected, "Rejected", lambda r: 0, job, REJECTED_PATTERN, 1, "jsonl")

    counts = (
        (
            raw | "CountRead" >> beam.Map(lambda _: ("seeds_in", 1)),
            checked.rejected | "CountRejected" >> beam.Map(lambda r: (f"rejected.{r['reason']}", 1)),
            (written, dead) | "Files" >> beam.Flatten() | "CountFiles" >> beam.FlatMap(_file_counts),
        )
        | "AllCounts" >> beam.Flatten()
        | "Sum" >> beam.CombinePerKey(sum)
        | "ToDict" >> beam.combiners.ToDict()
    )
    counts | "WriteStats" >> beam.Map(lambda d: write_json(join(job.output, STATS_FILE), d))
    return {"records": records, "rejected": checked.rejected, "stats": counts}


def _file_counts(stats: dict[str, Any]) -> list[tuple[str, int]]:
    if stats["kind"] == "rejected":
        return [("files.rejected", 1)]
    return [("rows", stats["rows"]), ("new_tokens", stats["new_tokens"]), ("eos", stats["eos"]), ("files.parquet", 1)]


def signature(job: GenerateJob) -> dict[str, Any]:
    """What defines a run's output: a rerun with the same signature rewrites the folder."""
    from kogpt2.model import model_fingerprint

    return {
        "pipeline": "generate",
        "model": job.model,
        "model_fingerprint": model_fingerprint(local_copy(job.model)),
        "seeds": list(job.seeds),
        "seed_column": job.seed_column,
        "config": job.config.describe(),
        "batch_size": job.batch_size,
        "dtype": job.dtype,
        "num_shards": job.num_shards,
        "max_seed_tokens": job.max_seed_tokens,
    }


def _show_progress() -> None:
    """Make this module's INFO progress lines visible when nobody configured logging for them."""
    if log.getEffectiveLevel() > logging.INFO and not any(getattr(h, "_kogpt2_progress", False) for h in log.handlers):
        log.setLevel(logging.INFO)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._kogpt2_progress = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False


def run(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline and write ``info.json`` and ``COMPLETED``; return 0.

    Raises:
        ValueError / FileNotFoundError: bad flags or inputs.
        OutputConflictError: ``--output`` holds another run (use ``--overwrite``).
        RuntimeError: the pipeline failed, or rows went missing (the accounting check).
    """
    import kogpt2
    from kogpt2.model import library_versions

    _show_progress()
    job, beam_args = parse_args(argv)
    sig = signature(job)
    prepare_output(job.output, sig, overwrite=job.overwrite)
    log.info("generating from %d seed files into %s (%s)", len(job.seeds), job.output, job.config)
    started = time.time()
    p = create_pipeline(pipeline_options(beam_args))
    build_pipeline(p, job)
    result = p.run()
    state = result.wait_until_finish()
    wall = time.time() - started
    if str(state).split(".")[-1] not in ("DONE", "None"):
        raise RuntimeError(f"pipeline ended in state {state}")
    stats_path = join(job.output, STATS_FILE)
    counts = json.loads(read_text(stats_path))
    rejected_by = {k.split(".", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("rejected.")}
    seeds_in, rows = counts.get("seeds_in", 0), counts.get("rows", 0)
    rejected = sum(rejected_by.values())
    n = job.config.num_samples
    if seeds_in * n != rows + rejected * n:
        raise RuntimeError(
            f"rows went missing: {seeds_in} seeds x {n} samples != {rows} rows + {rejected} rejected x {n}"
        )
    tokens = counts.get("new_tokens", 0)
    info = {
        "created_by": f"kogpt2-pipeline {kogpt2.__version__}",
        "model": sig["model"],
        "model_fingerprint": sig["model_fingerprint"],
        "seeds": list(job.seeds),
        "config": job.config.describe(),
        "batch_size": job.batch_size,
        "dtype": job.dtype,
        "counts": {
            "seeds_in": seeds_in,
            "seeds_valid": seeds_in - rejected,
            "rejected": rejected,
            "rejected_by_reason": rejected_by,
            "rows": rows,
            "finish_eos": counts.get("eos", 0),
            "finish_length": rows - counts.get("eos", 0),
        },
        "new_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
        "files": {
            "parquet": [PARQUET_PATTERN.format(shard=i, num_shards=job.num_shards) for i in range(job.num_shards)],
            "rejected": [REJECTED_PATTERN.format(shard=0, num_shards=1)],
        },
        "versions": library_versions(),
    }
    write_json(join(job.output, INFO_FILE), info)
    FileSystems.delete([stats_path])
    mark_completed(job.output)
    summary = (
        f"{seeds_in} seeds -> {rows} rows ({rejected} seeds rejected), {tokens} tokens in {wall:.1f} s "
        f"({info['tokens_per_second']} tokens/s); output {job.output}"
    )
    log.info(summary)
    return 0


if __name__ == "__main__":
    sys.exit(run())
