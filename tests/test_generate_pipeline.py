"""Bulk generation pipeline: seeds in four formats -> Parquet, dead letters, info.json, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOOD_TXT = ["이때", "그날 밤", "마침내 그는"]


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory) -> Path:
    """Good seeds with bad ones between them, in .txt, .jsonl, .csv and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("seeds")
    lines = [GOOD_TXT[0].encode(), b"", GOOD_TXT[1].encode(), b"\xff\xfe\xbf bad bytes", GOOD_TXT[2].encode()]
    lines.append(("아주 " * 400).encode())  # over-long for 256 positions
    (d / "a.txt").write_bytes(b"\n".join(lines) + b"\n")
    (d / "b.jsonl").write_text('{"seed": "노인은"}\n{"other": 1}\n', encoding="utf-8")
    (d / "c.csv").write_text("id,seed\n1,우리는\n2,\n", encoding="utf-8")
    pq.write_table(pa.table({"seed": ["사람들은", None]}), d / "d.parquet")
    return d


GOOD = {"이때", "그날 밤", "마침내 그는", "노인은", "우리는", "사람들은"}
REJECTED = {"empty": 3, "undecodable": 1, "too_long": 1, "bad_record": 1}


def argv(model_dir, seeds_dir, out, *extra):
    return [
        "--model", str(model_dir), "--seeds", str(seeds_dir / "*"), "--output", str(out),
        "--num-samples", "2", "--max-new-tokens", "6", "--num-shards", "2", "--top-p", "0.9", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, seeds_dir, tmp_path_factory):
    from pipelines.generate import run

    out = tmp_path_factory.mktemp("gen") / "out"
    assert run(argv(tiny_model_dir, seeds_dir, out)) == 0
    return out


def read_rows(out: Path):
    import pyarrow.parquet as pq

    files = sorted(out.glob("generations-*.parquet"))
    return files, [pq.read_table(f) for f in files]


def test_pipeline_writes_parquet_matching_the_schema(first_run):
    import pyarrow as pa

    from kogpt2.schemas import arrow_schema

    files, tables = read_rows(first_run)
    assert [f.name for f in files] == ["generations-00000-of-00002.parquet", "generations-00001-of-00002.parquet"]
    for t in tables:
        assert t.schema.equals(arrow_schema(), check_metadata=False)
    rows = pa.concat_tables(tables).to_pylist()
    assert {(r["seed"], r["sample_index"]) for r in rows} == {(s, i) for s in GOOD for i in range(2)}
    assert len(rows) == 12
    for r in rows:
        assert r["text"].startswith(r["seed"]) and r["text"].endswith(r["continuation"])
        assert r["strategy"] == "sample" and r["top_p"] == 0.9 and r["max_new_tokens"] == 6
        assert r["finish_reason"] in ("eos", "length") and 1 <= r["new_tokens"] <= 6
        assert len(r["model_fingerprint"]) == 64 and len(r["tokenizer_fingerprint"]) == 64
    for t in tables:  # each shard sorted by (seed, sample_index)
        keys = list(zip(t["seed"].to_pylist(), t["sample_index"].to_pylist(), strict=True))
        assert keys == sorted(keys)


def test_bad_seeds_are_dead_lettered_with_reasons_and_counted(first_run):
    rejected = [json.loads(line) for line in (first_run / "rejected-00000-of-00001.jsonl").read_text().splitlines()]
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    assert reasons == REJECTED
    assert any(
        r["reason"] == "undecodable" and r["source"].endswith("a.txt") and "\\xff" in r["seed"] for r in rejected
    )
    info = json.loads((first_run / "info.json").read_text())
    counts = info["counts"]
    assert counts["seeds_in"] == 12 and counts["rejected"] == 6 and counts["rows"] == 12
    assert counts["rejected_by_reason"] == REJECTED
    assert counts["seeds_in"] * 2 == counts["rows"] + counts["rejected"] * 2  # nothing silently missing
    assert info["new_tokens"] > 0 and info["tokens_per_second"] > 0 and info["wall_seconds"] > 0
    assert (first_run / "COMPLETED").exists()
    assert not (first_run / "_stats.json").exists()


def test_rerun_with_the_same_flags_rewrites_identical_parquet(first_run, tiny_model_dir, seeds_dir):
    from pipelines.common import OutputConflictError
    from pipelines.generate import run

    _, before = read_rows(first_run)
    assert run(argv(tiny_model_dir, seeds_dir, first_run)) == 0
    _, after = read_rows(first_run)
    assert all(a.equals(b) for a, b in zip(before, after, strict=True))
    with pytest.raises(OutputConflictError):
        run(argv(tiny_model_dir, seeds_dir, first_run, "--seed", "5"))


def test_build_pipeline_on_a_test_pipeline(tiny_model_dir, seeds_dir, tmp_path, test_pipeline):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.generate import build_pipeline, parse_args

    job, beam_args = parse_args(
        ["--model", str(tiny_model_dir), "--seeds", str(seeds_dir / "b.jsonl"), "--output", str(tmp_path),
         "--greedy", "--num-samples", "3", "--max-new-tokens", "4", "--batch-size", "2", "--direct_num_workers", "1"]
    )  # fmt: skip
    assert beam_args == ["--direct_num_workers", "1"]
    with test_pipeline as p:
        out = build_pipeline(p, job)
        keys = out["records"] | "Keys" >> beam.Map(lambda r: (r["seed"], r["sample_index"], r["strategy"]))
        assert_that(keys, equal_to([("노인은", i, "greedy") for i in range(3)]), label="Rows")
        reasons = out["rejected"] | "Reasons" >> beam.Map(lambda r: r["reason"])
        assert_that(reasons, equal_to(["bad_record"]), label="Dead")
    texts = {r["text"] for r in read_rows(tmp_path)[1][0].to_pylist()}
    assert len(texts) == 1  # greedy: every sample the same


def test_bad_flags_fail_before_running(tiny_model_dir, seeds_dir, tmp_path):
    from pipelines.generate import run

    with pytest.raises(ValueError, match="--greedy cannot be combined with --top-k"):
        run(argv(tiny_model_dir, seeds_dir, tmp_path / "x", "--greedy", "--top-k", "5"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        run(["--model", str(tiny_model_dir), "--seeds", str(tmp_path / "none*.txt"), "--output", str(tmp_path / "y")])


def test_handler_options_reach_runinference():
    from kogpt2.generation import GenerationConfig
    from pipelines.generate import GeneratorHandler

    handler = GeneratorHandler("m", GenerationConfig(), batch_size=16, dtype="float32", share=True)
    assert handler.share_model_across_processes() is True
    assert handler.batch_elements_kwargs() == {"min_batch_size": 16, "max_batch_size": 16}
    assert not GeneratorHandler("m", GenerationConfig(), batch_size=4, dtype="float32").share_model_across_processes()
