"""schemas/: the specs code loads, and the package data an installed copy needs."""

from __future__ import annotations

import copy
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kogpt2.schemas import arrow_schema, load_schema, tf_feature_spec, tfrecord_features, validate_info

REPO = Path(__file__).resolve().parents[1]

VALID_INFO = {
    "schema_version": 1,
    "created_by": "kogpt2-pipeline 0.1.0",
    "data_fingerprint": "ab" * 32,
    "tokenizer": {"fingerprint": "cd" * 32, "vocab_size": 400, "bos_id": 0, "eos_id": 1, "pad_id": 3, "unk_id": 5},
    "max_len": 30,
    "packing": False,
    "val_fraction": 0.1,
    "inputs": ["corpus.txt"],
    "counts": {
        "lines_read": 10,
        "kept": 8,
        "filtered": {"empty": 1},
        "rejected": 1,
        "truncated": 0,
        "examples": {"train": 7, "validation": 1},
        "tokens": {"train": 70, "validation": 10},
        "unk_tokens": 0,
        "unk_rate": 0.0,
    },
    "shards": {"train": ["train-00000-of-00001.tfrecord.gz"], "validation": ["validation-00000-of-00001.tfrecord.gz"]},
}


def test_tfrecord_spec_drives_the_parse_spec() -> None:
    names = [f["name"] for f in tfrecord_features()]
    assert names == ["input_ids", "length"]
    spec = tf_feature_spec(30)
    assert spec["input_ids"].shape == [30] and spec["input_ids"].dtype.name == "int64"
    assert spec["length"].shape == []
    assert load_schema("tfrecord_example")["compression"] == "GZIP"


def test_arrow_schema_uses_plain_types_only() -> None:
    import pyarrow as pa

    schema = arrow_schema()
    assert schema.names[:5] == ["row_id", "seed", "prompt", "sample_index", "text"]
    plain = (pa.string(), pa.int32(), pa.int64(), pa.float64())
    assert all(field.type in plain for field in schema)
    assert all(not field.nullable for field in schema)
    assert schema.field("finish_reason").metadata[b"description"].startswith(b"eos")


def test_validate_info_accepts_valid_and_names_bad_field() -> None:
    validate_info(VALID_INFO)
    bad = copy.deepcopy(VALID_INFO)
    bad["counts"]["unk_rate"] = 1.5
    with pytest.raises(ValueError, match=r"info\.counts\.unk_rate"):
        validate_info(bad)
    bad = copy.deepcopy(VALID_INFO)
    del bad["tokenizer"]["pad_id"]
    with pytest.raises(ValueError, match=r"info\.tokenizer\.pad_id: required"):
        validate_info(bad)
    bad = copy.deepcopy(VALID_INFO)
    bad["packing"] = "no"
    with pytest.raises(ValueError, match="boolean"):
        validate_info(bad)


def test_info_schema_is_valid_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema("shard_info")
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(VALID_INFO, schema)


@pytest.mark.slow
def test_wheel_ships_schemas_corpus_kernel_source_and_console_script(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("kogpt2_pipeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for schema in ("tfrecord_example.json", "shard_info.json", "generations.json"):
        assert f"kogpt2/schema_files/{schema}" in names, schema
    assert "kogpt2/data/corpus.txt" in names and "kogpt2/data/seeds.txt" in names
    assert "pipelines/common.py" in names
    assert "kogpt2/native/cached_attention.cc" in names  # workers build the attention kernel from it
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kogpt2 = kogpt2.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_readme_tables_match_the_schemas() -> None:
    from kogpt2.schemas import markdown_table

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table("tfrecord_example") in readme
    assert markdown_table("generations") in readme
