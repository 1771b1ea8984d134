"""Seeds for bulk generation: tables in, typed rows out, every bad record a dead letter with its reason.

Four formats: ``.txt`` (one seed a line), ``.csv``, ``.jsonl`` and ``.parquet`` (a seed column,
any other columns). Each file is streamed once, record by record, so every record keeps its
place (file, 1-based line or row number): that place is the row's ``row_id`` unless the user
names an id column (``--id-column``), and it is stable across reruns.

:class:`ValidateSeeds` turns each record into a :class:`SeedRow` (the seed, the prompt built
from ``--prompt-template``, the columns kept with ``--keep-columns``, the row's own sampling
settings) or a :class:`Rejected` dead letter (``empty``, ``undecodable``, ``too_long``,
``bad_record``, ``template``, ``bad_setting``), before any batching.
"""

from __future__ import annotations

import csv
import io
import json
import os
import string
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines.common import local_copy

NAMESPACE = "kogpt2_generate"
FORMATS = {".txt": "text", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
#: ``--keep-columns '*'``: every input column (but the seed column and the per-row settings).
ALL_COLUMNS = "*"


def file_kind(path: str) -> str:
    return FORMATS[os.path.splitext(path)[1].lower()]


class Record(NamedTuple):
    """One input record: its place, and either a raw line (``.txt``, ``.jsonl``) or a row of columns."""

    source: str
    number: int  # 1-based line (.txt, .jsonl) or row (.csv, .parquet) number
    kind: str
    raw: Any  # bytes of a line, or a dict of columns


class ReadRecords(beam.DoFn):
    """A matched file -> its :class:`Record` s, streamed (one file is read by one worker, in order)."""

    def __init__(self, parquet_columns: Sequence[str] | None) -> None:
        self._columns = list(parquet_columns) if parquet_columns is not None else None

    def process(self, readable: Any) -> Iterator[Record]:
        path = readable.metadata.path
        kind = file_kind(path)
        with readable.open() as f:
            if kind in ("text", "jsonl"):
                for i, line in enumerate(f, 1):
                    yield Record(path, i, kind, line)
            elif kind == "csv":
                text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
                reader = csv.DictReader(text)
                for i, row in enumerate(reader, 1):
                    yield Record(path, i, kind, row)
            else:
                import pyarrow.parquet as pq

                parquet = pq.ParquetFile(f)
                names = parquet.schema_arrow.names
                columns = [c for c in self._columns if c in names] if self._columns is not None else None
                i = 0
                for batch in parquet.iter_batches(batch_size=4096, columns=columns):
                    for row in batch.to_pylist():
                        i += 1
                        yield Record(path, i, kind, row)


class SeedRow(NamedTuple):
    """A valid input row.

    Attributes:
        row_id: the user's id (``--id-column``) or ``file:line``; in every output row.
        key: ``(source, index)``: unique per input row, even when ids repeat.
        seed: the seed column's text.
        prompt: what the model continues (``--prompt-template`` filled, or the seed).
        columns: the kept input columns, with their values as read.
        settings: the row's own sampling settings (:func:`kogpt2.row_settings.row_overrides`).
        tokens: the prompt's length in tokens, ``<s>`` included (before any cut to fit a
            ``max_new_tokens``): what places the row in a work unit of similar lengths.
    """

    row_id: str
    key: tuple[str, int]
    seed: str
    prompt: str
    columns: dict[str, Any]
    settings: dict[str, Any]
    tokens: int = 0


class Rejected(NamedTuple):
    """A record that cannot be generated from: a dead letter."""

    source: str
    seed: str | None
    reason: str
    detail: str
    row_id: str | None = None
    line: int | None = None

    def key(self) -> str:
        return f"{self.source}\x1f{self.line}\x1f{self.seed}\x1f{self.detail}"

    def to_json(self) -> str:
        return json.dumps(self._asdict(), ensure_ascii=False, sort_keys=True)


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


def is_blank(text: str) -> bool:
    """True when ``text`` has nothing to continue: only whitespace, control, format (zero-width) characters."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def template_fields(template: str) -> list[str]:
    """The field names a ``--prompt-template`` uses (``{title} 리뷰: {seed}`` -> ``[title, seed]``).

    Raises:
        ValueError: not a valid template, or a field that is not a plain name (``{a.b}``, ``{0}``, ``{}``).
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"--prompt-template {template!r}: {exc}") from None
    fields = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"--prompt-template {template!r}: {{{name}}} must be a plain column name, like {{title}} "
                "(no index, attribute, format spec or conversion)"
            )
        fields.append(name)
    if not fields:
        raise ValueError(f"--prompt-template {template!r}: it uses no column; put {{seed}} (or a column) in it")
    return fields


def fill_template(template: str, values: dict[str, Any]) -> str:
    """The prompt: ``template`` with each field's text.

    Raises:
        KeyError: a field the row does not have (or holds null for).
        TypeError: a field whose value is not text.
    """
    out = {}
    for name in template_fields(template):
        value = values.get(name)
        if value is None:
            raise KeyError(name)
        if not isinstance(value, str):
            raise TypeError(f"{name} holds a {type(value).__name__}, not text")
        out[name] = value
    return template.format_map(out)


class ValidateSeeds(beam.DoFn):
    """:class:`Record` -> a :class:`SeedRow`, or a :class:`Rejected` dead letter (tagged output)."""

    REJECTED = "rejected"

    def __init__(
        self,
        model_dir: str,
        column: str,
        max_tokens: int,
        *,
        id_column: str | None = None,
        keep: Sequence[str] = (),
        template: str | None = None,
        check_settings: Any = None,
    ) -> None:
        self._model_dir = model_dir
        self._column = column
        self._max_tokens = max_tokens
        self._id_column = id_column
        self._keep = tuple(keep)
        self._template = template
        self._check_settings = check_settings  # row settings -> (prompt limit) or raises SettingError
        self._tokenizer: Any = None
        self._read = Metrics.counter(NAMESPACE, "seeds_read")
        self._valid = Metrics.counter(NAMESPACE, "seeds_valid")
        self._rejected = Metrics.counter(NAMESPACE, "seeds_rejected")

    def setup(self) -> None:
        from kogpt2.tokenizer import load_tokenizer

        self._tokenizer = load_tokenizer(local_copy(self._model_dir))

    def _reject(self, record: Record, raw: Any, reason: str, row_id: str | None) -> beam.pvalue.TaggedOutput:
        self._rejected.inc()
        kind = reason.split(":")[0]
        Metrics.counter(NAMESPACE, f"rejected_{kind}").inc()
        shown: str | None
        if isinstance(raw, bytes):
            shown = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
        elif isinstance(raw, str):
            shown = raw.encode("utf-8", errors="backslashreplace").decode("utf-8")
        else:
            shown = None if raw is None else repr(raw)
        letter = Rejected(record.source, shown, kind, reason, row_id, record.number)
        return beam.pvalue.TaggedOutput(self.REJECTED, letter)

    def _columns(self, record: Record) -> tuple[dict[str, Any] | None, Any, str]:
        """The record's columns (None for a .txt line), its raw seed value, and why it is bad ("" if fine)."""
        if record.kind == "text":
            return None, record.raw, ""
        if record.kind == "jsonl":
            text, reason = _decode(record.raw)
            if text is None:
                return None, record.raw, reason
            if is_blank(text):
                return None, record.raw, "empty"
            try:
                obj = json.loads(text)
            except ValueError as exc:
                return None, record.raw, f"bad_record: not JSON ({exc})"
            if not isinstance(obj, dict):
                return None, record.raw, "bad_record: not a JSON object"
            columns = obj
        else:
            columns = dict(record.raw)
        if self._column not in columns:
            return columns, None, f"bad_record: no column {self._column!r}"
        return columns, columns[self._column], ""

    def process(self, record: Record) -> Iterable[Any]:
        from kogpt2.row_settings import SettingError, row_overrides

        self._read.inc()
        columns, raw, reason = self._columns(record)
        row_id = f"{record.source}:{record.number}"
        if self._id_column and columns is not None:
            value = columns.get(self._id_column)
            if value is None or (isinstance(value, str) and not value.strip()):
                yield self._reject(record, raw, f"bad_record: no id in column {self._id_column!r}", None)
                return
            row_id = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if reason:
            yield self._reject(record, raw, reason, row_id)
            return
        seed, reason = _decode(raw)
        if seed is None:
            yield self._reject(record, raw, reason, row_id)
            return
        if is_blank(seed):
            yield self._reject(record, raw, "empty", row_id)
            return
        values = dict(columns or {})
        values[self._column] = seed
        prompt = seed
        if self._template is not None:
            try:
                prompt = fill_template(self._template, values)
            except KeyError as exc:
                yield self._reject(record, seed, f"template: no value for {{{exc.args[0]}}}", row_id)
                return
            except TypeError as exc:
                yield self._reject(record, seed, f"template: {exc}", row_id)
                return
        try:
            settings = row_overrides(columns or {}, text_column=self._column)
            limit = self._check_settings(settings) if self._check_settings else self._max_tokens
        except SettingError as exc:
            yield self._reject(record, seed, f"bad_setting: {exc}", row_id)
            return
        n = 1 + len(self._tokenizer.encode(prompt))  # <s> + the prompt
        if n > limit:
            yield self._reject(record, prompt, f"too_long: {n} tokens > {limit}", row_id)
            return
        kept = {}
        if columns is not None:
            names = self._keep
            if names == (ALL_COLUMNS,):
                from kogpt2.row_settings import ROW_SETTINGS, SEED_ALIAS

                settings_columns = {*ROW_SETTINGS, SEED_ALIAS}
                names = tuple(k for k in columns if k != self._column and k not in settings_columns)
            kept = {k: columns.get(k) for k in names}
            if record.kind == "csv":  # CSV has no null: an empty cell is one
                kept = {k: (None if v == "" else v) for k, v in kept.items()}
        self._valid.inc()
        yield SeedRow(row_id, (record.source, record.number), seed, prompt, kept, settings, n)


def read_seeds(p: beam.Pipeline, files: Sequence[str], parquet_columns: Sequence[str] | None) -> beam.PCollection:
    """Every record of ``files`` as a :class:`Record` (through Beam's file IO: local, ``gs://``, ...)."""
    from apache_beam.io import fileio

    return (
        p
        | "SeedFiles" >> beam.Create(list(files), reshuffle=False)
        | "MatchSeeds" >> fileio.MatchAll(fileio.EmptyMatchTreatment.DISALLOW)
        | "OpenSeeds" >> fileio.ReadMatches(skip_directories=True)
        | "SpreadFiles" >> beam.Reshuffle()
        | "ReadRecords" >> beam.ParDo(ReadRecords(parquet_columns))
    )


def column_types(files: Sequence[str]) -> dict[str, dict[str, str]]:
    """``path -> {column: Arrow type}`` of the Parquet files (their schemas, read without their rows)."""
    import pyarrow.parquet as pq

    from kogpt2.storage import store_for

    out = {}
    for path in files:
        if file_kind(path) == "parquet":
            with store_for(path).open_read(path) as f:
                schema = pq.read_schema(f)
            out[path] = {f.name: str(f.type) for f in schema}
    return out


def csv_header(path: str) -> list[str]:
    """The column names of a CSV file (its first line)."""
    from kogpt2.storage import store_for

    with store_for(path).open_read(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
        return next(csv.reader(text), [])
