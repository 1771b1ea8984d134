"""Load the machine-readable specs in ``schemas/``: one source of truth each, checked with ``jsonschema``.

- ``tfrecord_example.json``: features of the TFRecord shards.
- ``shard_info.json``: JSON Schema of ``info.json`` beside the shards.
- ``generations.json``: columns of the generation Parquet files.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

SCHEMA_FILES = ("tfrecord_example.json", "shard_info.json", "generations.json")


def schema_file(name: str) -> Traversable:
    """One schema file, from the installed package data (``kogpt2.schema_files``)."""
    return resources.files("kogpt2.schema_files").joinpath(name)


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Return one schema file's JSON, by file name (``tfrecord_example.json``) or stem."""
    if not name.endswith(".json"):
        name += ".json"
    if name not in SCHEMA_FILES:
        raise ValueError(f"unknown schema {name!r}; known: {SCHEMA_FILES}")
    return dict(json.loads(schema_file(name).read_text(encoding="utf-8")))


def tfrecord_features() -> list[dict[str, Any]]:
    """The TFRecord feature list (name, dtype, shape, description)."""
    return list(load_schema("tfrecord_example")["features"])


def tf_feature_spec(max_len: int) -> dict[str, Any]:
    """A ``tf.io.parse_example`` spec for shards of ``max_len`` tokens."""
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    spec = {}
    for feat in tfrecord_features():
        shape = [max_len if d == "max_len" else int(d) for d in feat["shape"]]
        spec[feat["name"]] = tf.io.FixedLenFeature(shape, tf.as_dtype(feat["dtype"]))
    return spec


def arrow_schema() -> Any:
    """The ``pyarrow.Schema`` of generation Parquet files (plain Arrow types only)."""
    import pyarrow as pa

    spec = load_schema("generations")
    fields = [
        pa.field(
            c["name"], pa.type_for_alias(c["type"]), nullable=c["nullable"], metadata={"description": c["description"]}
        )
        for c in spec["columns"]
    ]
    return pa.schema(fields, metadata={"kogpt2_schema_version": str(spec["schema_version"])})


def validate_info(info: dict[str, Any]) -> None:
    """Check an ``info.json`` document against ``shard_info.json`` (JSON Schema, with ``jsonschema``).

    Raises:
        ValueError: naming the field that does not conform (``info.counts.unk_rate=1.5: ...``), and why.
    """
    import jsonschema

    error = jsonschema.exceptions.best_match(_info_validator().iter_errors(info))
    if error is not None:
        raise ValueError(_describe(error, "info"))


@cache
def _info_validator() -> Any:
    import jsonschema

    schema = load_schema("shard_info")
    return jsonschema.validators.validator_for(schema)(schema)


def _describe(error: Any, root: str) -> str:
    """``where: what`` of a ``jsonschema`` error: the field as a dotted path, its value, the rule broken."""
    where = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    if error.validator == "required":
        missing = [key for key in error.validator_value if key not in error.instance]
        return f"{where}.{missing[0]}: required field missing"
    return f"{where}={error.instance!r}: {error.message}"


def markdown_table(name: str) -> str:
    """A Markdown table of a schema's fields, as the README shows it (kept in sync by a test).

    Args:
        name: ``tfrecord_example`` (features) or ``generations`` (Parquet columns).
    """
    rows: list[tuple[str, ...]]
    header: tuple[str, ...]
    if name == "tfrecord_example":
        rows = [
            (f"`{f['name']}`", f["dtype"], "[" + ", ".join(map(str, f["shape"])) + "]", f["description"])
            for f in tfrecord_features()
        ]
        header = ("feature", "dtype", "shape", "description")
    elif name == "generations":
        rows = [(f"`{c['name']}`", c["type"], c["description"]) for c in load_schema("generations")["columns"]]
        header = ("column", "type", "description")
    else:
        raise ValueError(f"markdown_table: name={name!r} must be 'tfrecord_example' or 'generations'")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
