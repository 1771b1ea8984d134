"""Generation jobs as teams run them: tables with ids in, partitioned tables out.

Kept columns with their types, stable row ids, prompt templates, per-row sampling settings,
several named configurations in one pass, duplicates counted (never dropped), kill + rerun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kogpt2 import outputs

REPO = Path(__file__).resolve().parents[1]
SEEDS = ["이때", "그날 밤", "마침내 그는", "노인은", "우리는", "사람들은"]


def gen(model: Path, seeds, out: Path, *extra: str) -> int:
    from pipelines.generate import main

    args = ["--model", str(model), "--output", str(out), "--max-new-tokens", "5", "--num-shards", "2"]
    for s in seeds if isinstance(seeds, list) else [seeds]:
        args += ["--seeds", str(s)]
    return main([*args, *extra])


def version(out: Path) -> Path:
    return Path(outputs.open_committed(str(out), job="generate", verify="full").root)


def info_of(out: Path) -> dict:
    return json.loads((version(out) / "info.json").read_text())


def rows_of(out: Path) -> list[dict]:
    """Every row of the committed version, read as a Hive-partitioned Arrow dataset (config=NAME/ -> config)."""
    import pyarrow.dataset as ds

    root = version(out)
    files = [str(p) for p in sorted(root.rglob("generations-*.parquet"))]
    dataset = ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=str(root))
    return dataset.to_table().to_pylist()


def letters(out: Path, folder: Path | None = None) -> list[dict]:
    root = folder or version(out)
    return [json.loads(x) for f in sorted(root.glob("rejected-*.jsonl")) for x in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("tables")
    pq.write_table(
        pa.table(
            {
                "id": pa.array([10, 11, 12], pa.int32()),
                "text": SEEDS[:3],
                "topic": ["영화", "소설", None],
                "score": pa.array([0.5, 1.5, 2.5], pa.float32()),
                "tags": [["a"], ["b", "c"], []],
            }
        ),
        d / "a.parquet",
    )
    (d / "b.jsonl").write_text(
        "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {"id": 20, "text": SEEDS[3], "topic": "뉴스", "score": 3},
                {"id": 21, "text": SEEDS[4], "topic": "뉴스", "score": 3.5, "extra": {"k": 1}},
                {"id": 20, "text": SEEDS[5], "topic": "시"},  # a repeated id: reported, both generated
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    (d / "c.csv").write_text("id,text,topic,score\n30,이때,수필,\n", encoding="utf-8")  # an empty cell is null
    return {"parquet": d / "a.parquet", "jsonl": d / "b.jsonl", "csv": d / "c.csv", "dir": d}


def test_kept_columns_keep_their_types_and_every_row_carries_a_stable_id(tiny_model_dir, tables, tmp_path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    args = ["--seed-column", "text", "--id-column", "id", "--keep-columns", "topic,score", "--greedy"]
    assert gen(tiny_model_dir, [tables["parquet"], tables["jsonl"], tables["csv"]], out, *args) == 0
    rows = rows_of(out)
    assert len(rows) == 7
    by_id = {}
    for r in rows:
        by_id.setdefault(r["row_id"], []).append(r)
    assert sorted(by_id) == ["10", "11", "12", "20", "21", "30"]  # the user's ids, as text
    assert {r["seed"] for r in by_id["20"]} == {SEEDS[3], SEEDS[5]}  # a repeated id: both rows kept
    schema = pq.read_schema(next(version(out).glob("generations-*.parquet")))
    # Parquet's float32 meets JSON's 3 and 3.5 and CSV's nothing: one float column; text stays text
    assert str(schema.field("score").type) in ("double", "float") and str(schema.field("topic").type) == "string"
    assert by_id["11"][0]["score"] == 1.5 and by_id["20"][0]["score"] in (3.0, None)
    assert by_id["12"][0]["topic"] is None and by_id["30"][0]["topic"] == "수필"
    info = info_of(out)
    assert info["counts"]["duplicate_row_ids"] == 1 and info["counts"]["duplicate_row_id_examples"] == ["20"]
    # without --id-column every row is file:line, the same on every rerun
    again = tmp_path / "ids"
    assert gen(tiny_model_dir, tables["jsonl"], again, "--seed-column", "text", "--keep-columns", "*") == 0
    ids = sorted(r["row_id"] for r in rows_of(again))
    assert ids == sorted(f"{tables['jsonl']}:{n}" for n in (1, 2, 3) for _ in range(1))
    kept = rows_of(again)
    assert {"id", "topic", "score", "extra"} <= set(kept[0])  # '*': every column but the seed text
    assert any(r["extra"] == '{"k": 1}' for r in kept)  # an object as JSON text
    assert all(isinstance(r["id"], int) for r in kept)  # JSON numbers as numbers


def test_a_missing_column_in_a_table_file_is_refused_before_anything_runs(tiny_model_dir, tables, tmp_path, capsys):
    out = tmp_path / "out"
    assert gen(tiny_model_dir, tables["parquet"], out, "--seed-column", "text", "--keep-columns", "nope") == 2
    assert "--keep-columns nope" in capsys.readouterr().err and not out.exists()
    assert gen(tiny_model_dir, tables["csv"], out, "--seed-column", "text", "--keep-columns", "text") == 2
    assert "the output has columns of that name" in capsys.readouterr().err


def test_prompt_templates_fill_from_columns_and_dead_letter_what_they_cannot(tiny_model_dir, tables, tmp_path):
    out = tmp_path / "out"
    args = ["--seed-column", "text", "--id-column", "id", "--prompt-template", "{topic} 이야기: {text}"]
    assert gen(tiny_model_dir, [tables["parquet"], tables["jsonl"]], out, *args) == 0
    rows = rows_of(out)
    prompts = {r["row_id"]: r["prompt"] for r in rows}
    assert prompts["10"] == f"영화 이야기: {SEEDS[0]}" and all(r["text"].startswith(r["prompt"]) for r in rows)
    dead = {d["row_id"]: d for d in letters(out)}
    assert dead["12"]["reason"] == "template" and "{topic}" in dead["12"]["detail"]  # topic is null
    job = json.loads((version(out) / "job.json").read_text())
    assert job["prompt_template"] == "{topic} 이야기: {text}"
    # a field holding a number is not text: a dead letter saying so
    number = tmp_path / "number"
    assert (
        gen(tiny_model_dir, tables["jsonl"], number, "--seed-column", "text", "--prompt-template", "{score}: {text}")
        == 0
    )
    reasons = {d["detail"] for d in letters(number)}
    assert any("score holds a int" in r or "score holds a float" in r for r in reasons)


def test_per_row_settings_give_the_rows_of_single_setting_jobs(tiny_model_dir, tmp_path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    rows = [
        {"text": SEEDS[0], "temperature": 0.7, "top_p": 0.9, "num_samples": 2},
        {"text": SEEDS[1], "temperature": 1.3, "top_k": 5},
        {"text": SEEDS[2], "max_new_tokens": 3, "random_seed": 7},
        {"text": SEEDS[3], "top_p": 1.7},  # out of range: a dead letter naming the field
        {"text": SEEDS[4], "temperature": "hot"},
    ]
    (d / "mixed.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "mixed"
    assert gen(tiny_model_dir, d / "mixed.jsonl", out, "--seed-column", "text") == 0
    mixed = {(r["seed"], r["sample_index"]): r for r in rows_of(out)}
    assert len(mixed) == 4 and mixed[(SEEDS[0], 1)]["temperature"] == 0.7 and mixed[(SEEDS[1], 0)]["top_k"] == 5
    dead = {d["seed"]: d for d in letters(out)}
    assert dead[SEEDS[3]]["reason"] == "bad_setting" and "top_p" in dead[SEEDS[3]]["detail"]
    assert dead[SEEDS[4]]["reason"] == "bad_setting" and "temperature" in dead[SEEDS[4]]["detail"]
    # each row equals the same row made by a job with that setting for everyone
    for i, (row, flags) in enumerate(
        [
            (rows[0], ["--temperature", "0.7", "--top-p", "0.9", "--num-samples", "2"]),
            (rows[1], ["--temperature", "1.3", "--top-k", "5"]),
            (rows[2], ["--max-new-tokens", "3", "--seed", "7"]),
        ]
    ):
        single = tmp_path / f"single{i}"
        (d / f"s{i}.txt").write_text(row["text"] + "\n", encoding="utf-8")
        from pipelines.generate import main

        args = ["--model", str(tiny_model_dir), "--seeds", str(d / f"s{i}.txt"), "--output", str(single)]
        args += ["--max-new-tokens", "5", *flags] if "--max-new-tokens" not in flags else flags
        assert main(args) == 0
        for r in rows_of(single):
            assert mixed[(r["seed"], r["sample_index"])]["text"] == r["text"]


def test_a_grid_job_equals_the_separate_jobs_and_partitions_by_config(tiny_model_dir, tables, tmp_path, capsys):
    grid = tmp_path / "grid.jsonl"
    grid.write_text(
        '{"name": "greedy", "strategy": "greedy"}\n{"name": "t07", "temperature": 0.7}\n'
        '{"name": "p05", "top_p": 0.5, "num_samples": 2}\n',
        encoding="utf-8",
    )
    out = tmp_path / "grid"
    args = ["--seed-column", "text", "--id-column", "id"]
    assert gen(tiny_model_dir, tables["parquet"], out, *args, "--configs", str(grid)) == 0
    root = version(out)
    assert sorted(p.name for p in root.glob("config=*")) == ["config=greedy", "config=p05", "config=t07"]
    rows = rows_of(out)
    assert {r["config"] for r in rows} == {"greedy", "t07", "p05"}  # the partition column, read back
    assert len(rows) == 3 * (1 + 1 + 2)
    info = info_of(out)
    assert set(info["by_config"]) == {"greedy", "t07", "p05"} and info["by_config"]["p05"]["rows"] == 6
    for name, flags in (
        ("greedy", ["--greedy"]),
        ("t07", ["--temperature", "0.7"]),
        ("p05", ["--top-p", "0.5", "--num-samples", "2"]),
    ):
        single = tmp_path / name
        assert gen(tiny_model_dir, tables["parquet"], single, *args, *flags) == 0
        ours = {(r["row_id"], r["sample_index"]): r["text"] for r in rows if r["config"] == name}
        assert ours == {(r["row_id"], r["sample_index"]): r["text"] for r in rows_of(single)}
    # the report compares the configurations side by side, from the files themselves
    from kogpt2.gensummary import format_summary, summarize_generations

    summary = summarize_generations(str(out))
    assert {n: c["rows"] for n, c in summary["configs"].items()} == {"greedy": 3, "p05": 6, "t07": 3}
    assert summary["configs"]["greedy"]["duplicate_rate"] == info["by_config"]["greedy"]["duplicate_rate"]
    assert all(len(c["examples"]) == 3 for c in summary["configs"].values())
    text = format_summary(summary)
    assert "dist-1" in text and all(f"\n{n} " in text for n in ("greedy", "p05", "t07"))
    # a grid file is checked before anything runs: unknown keys and bad names are refused
    bad = tmp_path / "bad.jsonl"
    for line, message in (('{"name": "x", "top_pp": 0.5}', "did you mean 'top_p'"), ('{"name": "a/b"}', "folder name")):
        bad.write_text(line + "\n", encoding="utf-8")
        assert gen(tiny_model_dir, tables["parquet"], tmp_path / "never", *args, "--configs", str(bad)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_duplicates_are_counted_exactly_and_listed_never_dropped(tiny_model_dir, tmp_path) -> None:
    import pyarrow.parquet as pq

    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join([SEEDS[0]] * 3 + [SEEDS[1]] * 2 + [SEEDS[2]]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert gen(tiny_model_dir, seeds, out, "--greedy", "--dedup") == 0  # greedy: equal prompts, equal texts
    rows = rows_of(out)
    assert len(rows) == 6  # nothing dropped
    info = info_of(out)
    distinct = len({r["text_hash"] for r in rows})
    assert info["counts"]["duplicates"] == 6 - distinct and info["by_config"]["default"]["duplicates"] == 6 - distinct
    assert distinct <= 3 and info["by_config"]["default"]["duplicate_rate"] == pytest.approx((6 - distinct) / 6)
    dups = pq.read_table(version(out) / "duplicates.parquet").to_pylist()
    assert len(dups) == 6 - distinct == info["counts"]["duplicates_listed"]
    first = {r["row_id"]: r for r in rows}
    for d in dups:  # each listed row has the text of the first row of its group, which is not listed
        assert first[d["row_id"]]["text_hash"] == first[d["first_row_id"]]["text_hash"] == d["group"]
        assert d["first_row_id"] not in {x["row_id"] for x in dups}


KILLER = r"""
import os, signal, sys
from kogpt2 import outputs
calls = {"n": 0}
real = outputs.commit_unit
def commit_unit(*a, **k):
    real(*a, **k)
    calls["n"] += 1
    if calls["n"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
outputs.commit_unit = commit_unit
from pipelines.generate import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_and_rerun_of_a_table_grid_job_gives_the_uninterrupted_rows(tiny_model_dir, tables, tmp_path) -> None:
    grid = tmp_path / "grid.jsonl"
    grid.write_text('{"name": "a", "temperature": 0.8}\n{"name": "b", "top_k": 4}\n', encoding="utf-8")
    args = ["--seed-column", "text", "--id-column", "id", "--keep-columns", "topic", "--configs", str(grid),
            "--prompt-template", "{text}", "--num-shards", "4", "--dedup"]  # fmt: skip
    files = [tables["parquet"], tables["jsonl"], tables["csv"]]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert gen(tiny_model_dir, files, reference, *args) == 0
    argv = ["--model", str(tiny_model_dir), "--output", str(out), "--max-new-tokens", "5", "--num-shards", "2"]
    argv += [x for f in files for x in ("--seeds", str(f))] + args + ["--lease-seconds", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    time.sleep(1.1)
    assert gen(tiny_model_dir, files, out, *args) == 0
    key = lambda r: (r["config"], r["row_id"], r["seed"], r["sample_index"])  # noqa: E731
    assert sorted((key(r), r["text"], r["topic"]) for r in rows_of(out)) == sorted(
        (key(r), r["text"], r["topic"]) for r in rows_of(reference)
    )
    assert info_of(out)["units"]["resumed"] == 2 and info_of(out)["by_config"] == info_of(reference)["by_config"]


def test_units_hold_similar_prompt_lengths_and_ids_repeated_across_units_are_counted(tiny_model_dir, tmp_path) -> None:
    import pyarrow.parquet as pq

    from kogpt2.tokenizer import load_tokenizer
    from pipelines.generate_units import length_class

    tok = load_tokenizer(tiny_model_dir)

    def klass(prompt: str) -> int:
        return length_class(1 + len(tok.encode(prompt)))

    short_class = klass(SEEDS[0])
    short = [s for s in SEEDS if klass(s) == short_class]  # seeds of one length bucket
    long_seed = " ".join(SEEDS)  # another length bucket than the short seeds
    rows = [{"id": f"s{i}", "text": short[i % len(short)]} for i in range(30)]
    rows += [{"id": f"l{i}", "text": f"{long_seed} {i}"} for i in range(9)]
    rows.append({"id": "s0", "text": long_seed})  # the id of a short row, on a long one: in another unit
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    assert (
        gen(tiny_model_dir, table, out, "--seed-column", "text", "--id-column", "id", "--greedy", "--num-shards", "3")
        == 0
    )

    long = klass(long_seed)
    assert {klass(r["text"]) for r in rows[30:]} == {long} != {short_class}
    files = sorted(version(out).glob("generations-*.parquet"))
    per_file = [[klass(p) for p in pq.read_table(f, columns=["prompt"]).column("prompt").to_pylist()] for f in files]
    assert sum(map(len, per_file)) == len(rows)
    # 40 rows on a line of 30 short then 10 long, cut in 3: the long rows share the last unit alone
    assert [sorted(set(c)) for c in per_file] == [[short_class], [short_class], [short_class, long]]
    assert per_file[2].count(long) == 10
    ids = [pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist() for f in files]
    assert len([n for n, i in enumerate(ids) if "s0" in i]) == 2  # the repeated id sits in two units
    info = info_of(out)
    assert info["counts"]["duplicate_row_ids"] == 1 and info["counts"]["duplicate_row_id_examples"] == ["s0"]
    s0 = [r for r in rows_of(out) if r["row_id"] == "s0"]
    assert sorted(klass(r["prompt"]) for r in s0) == [short_class, long]  # both generated, never merged


def test_a_file_two_globs_match_is_read_once_and_file_line_ids_never_repeat(tiny_model_dir, tmp_path) -> None:
    from pipelines.generate import ids_may_repeat, make_plan, parse_args

    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join(SEEDS[:3]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert gen(tiny_model_dir, [seeds, tmp_path / "seeds.*"], out, "--greedy") == 0
    counts = info_of(out)["counts"]
    assert counts["seeds_in"] == counts["rows"] == 3 and counts["duplicate_row_ids"] == 0
    # a job built in code keeps its globs, which may read such a file twice: then its ids are counted
    job, _ = parse_args(["--model", str(tiny_model_dir), "--seeds", str(seeds), "--seeds", str(tmp_path / "seeds.*"),
                         "--output", str(tmp_path / "x")])  # fmt: skip
    assert job.seeds == (str(seeds),) and not ids_may_repeat(job, make_plan(job))
    in_code = dataclasses.replace(job, seeds=(str(seeds), str(tmp_path / "se*ds.txt")))
    assert ids_may_repeat(in_code, make_plan(in_code))
    assert ids_may_repeat(dataclasses.replace(job, id_column="id"), make_plan(job))
