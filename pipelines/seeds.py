"""Seeds for bulk generation: read through Beam IO in four formats, validated one by one.

``.txt`` (one seed a line), ``.csv``, ``.jsonl`` and ``.parquet`` (with a seed column).
Every record becomes a valid seed string or a :class:`Rejected` dead letter with its
reason (``empty``, ``undecodable``, ``too_long``, ``bad_record``), before any batching.
"""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines.common import local_copy

NAMESPACE = "kogpt2_generate"
FORMATS = {".txt": "text", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


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


def is_blank(text: str) -> bool:
    """True when ``text`` has nothing to continue: only whitespace, control, format (zero-width) characters."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


class Rejected(NamedTuple):
    """A seed that cannot be generated from: a dead letter."""

    source: str
    seed: str | None
    reason: str
    detail: str

    def key(self) -> str:
        return f"{self.source}\x1f{self.seed}\x1f{self.detail}"

    def to_json(self) -> str:
        return json.dumps(self._asdict(), ensure_ascii=False, sort_keys=True)


class ValidateSeeds(beam.DoFn):
    """``(kind, path, raw)`` -> a valid seed string, or a :class:`Rejected` record (tagged output)."""

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
        shown: str | None
        if isinstance(raw, bytes):
            shown = raw.decode("utf-8", errors="backslashreplace")
        elif isinstance(raw, str):
            shown = raw.encode("utf-8", errors="backslashreplace").decode("utf-8")
        else:
            shown = None if raw is None else repr(raw)
        return beam.pvalue.TaggedOutput(self.REJECTED, Rejected(path, shown, reason.split(":")[0], reason))

    def process(self, element: tuple[str, str, Any]) -> Iterable[Any]:
        kind, path, raw = element
        self._read.inc()
        if kind == "jsonl":
            text, reason = _decode(raw)
            if text is None:
                yield self._reject(path, raw, reason)
                return
            if is_blank(text):
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
        elif is_blank(seed):
            yield self._reject(path, raw, "empty")
        else:
            n = 1 + len(self._tokenizer.encode(seed))  # <s> + the seed
            if n > self._max_tokens:
                yield self._reject(path, seed, f"too_long: {n} tokens > {self._max_tokens}")
            else:
                self._valid.inc()
                yield seed


def read_seeds(p: beam.Pipeline, files: Sequence[str], column: str) -> beam.PCollection:
    """All seed records as ``(kind, path, raw value)``, through Beam IO, per file format."""
    from apache_beam.io import fileio
    from apache_beam.io.parquetio import ReadAllFromParquet
    from apache_beam.io.textio import ReadAllFromText

    by_kind: dict[str, list[str]] = {}
    for path in files:
        by_kind.setdefault(FORMATS[os.path.splitext(path)[1].lower()], []).append(path)
    parts = []
    for kind, files in sorted(by_kind.items()):
        listed = p | f"List{kind}" >> beam.Create(files)
        if kind in ("text", "jsonl"):
            lines = listed | f"Read{kind}" >> ReadAllFromText(coder=beam.coders.BytesCoder(), with_filename=True)
            parts.append(lines | f"Tag{kind}" >> beam.MapTuple(lambda path, line, k=kind: (k, path, line)))
        elif kind == "csv":
            rows = listed | "MatchCsv" >> fileio.MatchAll() | "OpenCsv" >> fileio.ReadMatches()
            rows = rows | "ParseCsv" >> beam.ParDo(ParseCsv(column))
            parts.append(rows | "Tagcsv" >> beam.MapTuple(lambda path, v: ("value", path, v)))
        else:
            col = column
            recs = listed | "ReadParquet" >> ReadAllFromParquet(columns=[col], with_filename=True)
            parts.append(recs | "Tagparquet" >> beam.MapTuple(lambda path, r, c=col: ("value", path, r.get(c))))
    return parts | "AllSeeds" >> beam.Flatten()
