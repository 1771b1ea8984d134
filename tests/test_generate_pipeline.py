"""Bulk generation pipeline: seeds in four formats -> Parquet work units, dead letters, resume, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def version(out: Path) -> Path:
    """The committed version folder of a generation output folder."""
    from kogpt2 import outputs

    return Path(outputs.open_committed(str(out), job="generate").root)


def work(out: Path) -> Path:
    """The work folder of the run in progress (or failed) in ``out``."""
    from kogpt2 import outputs

    pending = outputs.read_pending(str(out))
    assert pending is not None
    return out / pending.work


def tree(out: Path) -> dict[str, int]:
    """Every file under ``out`` (the lock and its mutex aside) with its modification time."""
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name not in (".lock", ".kogpt2-cas")
    }


GOOD_TXT = ["이때", "그날 밤", "마침내 그는"]


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory) -> Path:
    """Good seeds with bad ones between them, in .txt, .jsonl, .csv and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("seeds")
    lines = [GOOD_TXT[0].encode(), b"", GOOD_TXT[1].encode(), b"\xff\xfe\xbf bad bytes", GOOD_TXT[2].encode()]
    lines.append(("아주 " * 400).encode())  # over-long for 256 positions
    lines.append("\u200b\u200d\t\x07".encode())  # zero-width and control characters only: nothing to continue
    (d / "a.txt").write_bytes(b"\n".join(lines) + b"\n")
    (d / "b.jsonl").write_text('{"seed": "노인은"}\n{"other": 1}\n', encoding="utf-8")
    (d / "c.csv").write_text("id,seed\n1,우리는\n2,\n", encoding="utf-8")
    pq.write_table(pa.table({"seed": ["사람들은", None]}), d / "d.parquet")
    return d


GOOD = {"이때", "그날 밤", "마침내 그는", "노인은", "우리는", "사람들은"}
REJECTED = {"empty": 4, "undecodable": 1, "too_long": 1, "bad_record": 1}


def argv(model_dir, seeds, out, *extra):
    return [
        "--model", str(model_dir), "--seeds", str(seeds), "--output", str(out),
        "--num-samples", "2", "--max-new-tokens", "6", "--num-shards", "2", "--top-p", "0.9", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, seeds_dir, tmp_path_factory):
    from pipelines.generate import run

    out = tmp_path_factory.mktemp("gen") / "out"
    assert run(argv(tiny_model_dir, seeds_dir / "*", out)) == 0
    return out


def read_rows(out: Path):
    import pyarrow.parquet as pq

    files = sorted(version(out).glob("generations-*.parquet"))
    return files, [pq.read_table(f) for f in files]


def all_rows(out: Path) -> dict[tuple[str, int], dict]:
    rows = [r for t in read_rows(out)[1] for r in t.to_pylist()]
    keyed = {(r["seed"], r["sample_index"]): r for r in rows}
    assert len(keyed) == len(rows), "duplicate (seed, sample_index) rows"
    return keyed


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
    for t in tables:  # each file in input order (file, line), then sample_index; row_id is file:line
        keys = [
            (rid.rsplit(":", 1)[0], int(rid.rsplit(":", 1)[1]), i)
            for rid, i in zip(t["row_id"].to_pylist(), t["sample_index"].to_pylist(), strict=True)
        ]
        assert keys == sorted(keys)
    by_seed = {r["seed"]: r["row_id"] for r in rows}
    assert by_seed["그날 밤"].endswith("a.txt:3") and by_seed["우리는"].endswith("c.csv:1")  # stable places
    assert not list(first_run.rglob(".tmp-*")) and not (first_run / ".lock").exists()


def test_bad_seeds_are_dead_lettered_with_reasons_and_counted(first_run):
    rejected = [
        json.loads(line)
        for f in sorted(version(first_run).glob("rejected-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    assert reasons == REJECTED
    assert any(
        r["reason"] == "undecodable" and r["source"].endswith("a.txt") and "\\xff" in r["seed"] for r in rejected
    )
    info = json.loads((version(first_run) / "info.json").read_text())
    counts = info["counts"]
    assert info["status"] == "completed"
    assert counts["seeds_in"] == 13 and counts["rejected"] == 7 and counts["rows"] == 12
    assert counts["rejected_by_reason"] == REJECTED and counts["failed_rows"] == 0
    assert counts["seeds_in"] * 2 == counts["rows"] + counts["rejected"] * 2  # nothing silently missing
    assert info["new_tokens"] > 0 and info["tokens_per_second"] > 0 and info["wall_seconds"] > 0
    assert info["units"] == {"total": 2, "generated": 2, "resumed": 0, "failed": 0, "rows_per_file": None}
    assert info["files"]["parquet"] == [f.name for f in read_rows(first_run)[0]]
    from kogpt2 import outputs

    done = outputs.open_committed(str(first_run), job="generate", verify="full")  # every file as committed
    assert set(done.manifest.files) >= {"info.json", "job.json", *info["files"]["parquet"], *info["files"]["rejected"]}


def test_rerun_of_a_finished_folder_changes_nothing_and_another_run_is_refused(
    first_run, tiny_model_dir, seeds_dir, capsys
):
    from pipelines.generate import GenerateStatus, parse_args, run, run_config

    before = tree(first_run)
    assert run(argv(tiny_model_dir, seeds_dir / "*", first_run)) == 0
    assert tree(first_run) == before  # untouched, still complete
    result = run_config(parse_args(argv(tiny_model_dir, seeds_dir / "*", first_run))[0])
    assert (
        result.status is GenerateStatus.ALREADY_COMPLETE and result.version == 1 and result.info["counts"]["rows"] == 12
    )
    assert run(argv(tiny_model_dir, seeds_dir / "*", first_run, "--seed", "5")) == 2
    assert "config.seed: 0 -> 5" in capsys.readouterr().err
    assert run(argv(tiny_model_dir, seeds_dir / "*", first_run, "--batch-size", "8")) == 2
    assert "batch_size: 256 -> 8" in capsys.readouterr().err  # near-tie tokens can flip with it
    assert run(argv(tiny_model_dir, seeds_dir / "*", first_run, "--sampler", "graph")) == 2
    assert 'sampler: "host" -> "graph"' in capsys.readouterr().err  # the same draw, rounded differently
    assert tree(first_run) == before


def test_files_follow_the_job_size_and_rows_do_not_depend_on_them(first_run, tiny_model_dir, seeds_dir, tmp_path):
    from pipelines.generate import run

    out = tmp_path / "auto"
    args = argv(tiny_model_dir, seeds_dir / "*", out)
    i = args.index("--num-shards")
    assert run([*args[:i], *args[i + 2 :], "--rows-per-file", "5"]) == 0
    files, _ = read_rows(out)
    assert len(files) == 3  # 12 rows, 5 per file
    info = json.loads((version(out) / "info.json").read_text())
    assert info["units"]["total"] == 3 and info["units"]["rows_per_file"] == 5
    ours, reference = all_rows(out), all_rows(first_run)
    assert ours.keys() == reference.keys()
    assert all(ours[k]["text"] == reference[k]["text"] for k in ours)  # a row's text does not depend on its file


def test_build_pipeline_on_a_test_pipeline(tiny_model_dir, seeds_dir, tmp_path, test_pipeline):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from kogpt2 import outputs
    from pipelines.generate import JOB, build_pipeline, make_plan, parse_args, signature

    job, beam_args = parse_args(
        ["--model", str(tiny_model_dir), "--seeds", str(seeds_dir / "b.jsonl"), "--output", str(tmp_path),
         "--greedy", "--num-samples", "3", "--max-new-tokens", "4", "--batch-size", "2", "--direct_num_workers", "1"]
    )  # fmt: skip
    assert beam_args == ["--direct_num_workers", "1"]
    plan = make_plan(job)
    lease = outputs.Lease(job.output, JOB).acquire()
    claim = outputs.begin(job.output, JOB, signature(job, plan), lease)
    with test_pipeline as p:
        out = build_pipeline(p, job, plan, claim)
        valid = out["valid"] | "Seeds" >> beam.Map(lambda r: (r.seed, r.row_id.rsplit("/", 1)[-1]))
        assert_that(valid, equal_to([("노인은", "b.jsonl:1")]), label="Valid")
        reasons = out["rejected"] | "Reasons" >> beam.Map(lambda r: r.reason)
        assert_that(reasons, equal_to(["bad_record"]), label="Dead")
        units = out["units"] | "UnitRows" >> beam.Map(lambda s: (s.unit, s.rows, s.failed))
        assert_that(units, equal_to([(0, 3, 0)]), label="Units")
        status = out["info"] | "Status" >> beam.Map(lambda i: (i["status"], i["counts"]["rows"]))
        assert_that(status, equal_to([("completed", 3)]), label="Info")
    lease.release()
    texts = {r["text"] for r in read_rows(tmp_path)[1][0].to_pylist()}
    assert len(texts) == 1  # greedy: every sample the same
    assert outputs.read_manifest(str(tmp_path)) is not None  # committed by the pipeline itself, not by a launcher


def test_flags_in_either_spelling_and_unknown_ones_refused(tiny_model_dir, seeds_dir, tmp_path):
    from pipelines.generate import parse_args

    base = ["--model", str(tiny_model_dir), "--seeds", str(seeds_dir / "a.txt"), "--output", str(tmp_path / "o")]
    job, beam_args = parse_args([*base, "--top_p", "0.5", "--max_new_tokens", "5", "--num_samples", "3"])
    assert (job.config.top_p, job.config.max_new_tokens, job.config.num_samples) == (0.5, 5, 3)
    assert beam_args == []
    job, beam_args = parse_args([*base, "--top-p", "0.5", "--temp_location", "/tmp/x", "--direct_num_workers=2"])
    assert beam_args == ["--temp_location", "/tmp/x", "--direct_num_workers=2"]  # Beam's own, handed on
    with pytest.raises(ValueError, match=r"unknown option --top_pp; did you mean --top-p\?"):
        parse_args([*base, "--top_pp", "0.5"])
    with pytest.raises(ValueError, match="unknown option --max-tokens"):
        parse_args([*base, "--max-tokens", "5"])
    # every seed file given is read, or the command is refused: nothing is dropped
    job, _ = parse_args(["--model", str(tiny_model_dir), "--seeds", str(seeds_dir / "a.txt"), str(seeds_dir / "b.jsonl"),
                         "--output", str(tmp_path / "o")])  # fmt: skip
    assert job.seeds == (str(seeds_dir / "a.txt"), str(seeds_dir / "b.jsonl"))
    with pytest.raises(ValueError, match=r"unexpected argument\(s\): .*b\.jsonl"):
        parse_args([*base, "--greedy", str(seeds_dir / "b.jsonl")])
    with pytest.raises(ValueError, match="unknown option -x"):
        parse_args([*base, "-x", "1"])


def test_bad_inputs_exit_2_with_one_line_before_the_folder_is_touched(tiny_model_dir, seeds_dir, tmp_path, capsys):
    from pipelines.generate import main

    cases = [
        (argv(tiny_model_dir, seeds_dir / "*", tmp_path / "a", "--greedy", "--top-k", "5"), "--greedy cannot be"),
        (argv(tiny_model_dir, tmp_path / "none*.txt", tmp_path / "b"), "--seeds '"),
        (argv(tiny_model_dir, seeds_dir / "*", tmp_path / "c", "--max-new-tokens", "300"), "max_new_tokens=300"),
        (argv(tiny_model_dir, seeds_dir / "*", tiny_model_dir / "out", "--overwrite"), "lies inside an input"),
        (argv(tiny_model_dir, seeds_dir / "a.txt", seeds_dir, "--overwrite"), "contains an input"),
    ]
    for args, message in cases:
        before = sorted(os.listdir(tiny_model_dir)), sorted(os.listdir(seeds_dir))
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pipelines.generate: error:") and message in err[0], err
        assert (sorted(os.listdir(tiny_model_dir)), sorted(os.listdir(seeds_dir))) == before
    assert not any((tmp_path / n).exists() for n in "abc")
    no_positions = tmp_path / "model"
    no_positions.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    del config["n_positions"]
    (no_positions / "config.json").write_text(json.dumps(config))
    assert main(argv(no_positions, seeds_dir / "*", tmp_path / "d")) == 2
    assert "config.json has no n_positions" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_second_run_into_a_locked_folder_is_refused(tiny_model_dir, seeds_dir, tmp_path, capsys):
    from kogpt2.outputs import Lease
    from pipelines.generate import main, run

    out = tmp_path / "locked"
    with Lease(str(out), job="another run"):
        assert main(argv(tiny_model_dir, seeds_dir / "b.jsonl", out)) == 3  # locked: retry later
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    # a crashed run's lock (never released) is taken over once its lease has expired
    Lease(str(out), job="killed", lease_seconds=0.2).acquire()
    time.sleep(0.3)
    assert run(argv(tiny_model_dir, seeds_dir / "b.jsonl", out)) == 0
    assert not (out / ".lock").exists()


def _marked_failure(tokenizer, marked: str):
    """A ``_decode_batch`` that raises on batches holding ``marked`` (as a broken model or OOM would)."""
    import kogpt2.generation as generation

    real = generation._decode_batch
    marked_ids = [tokenizer.bos_id, *tokenizer.encode(marked)]

    def decode(decoder, tok, prompts, *args, **kwargs):
        if marked_ids in prompts:
            raise RuntimeError("simulated device failure")
        return real(decoder, tok, prompts, *args, **kwargs)

    return decode


def test_a_failing_batch_dead_letters_its_rows_and_a_rerun_redoes_its_unit(
    tiny_model_dir, tiny_tokenizer, seeds_dir, tmp_path, monkeypatch, caplog
):
    import kogpt2.generation as generation
    from pipelines.generate import main, run

    seeds = tmp_path / "seeds.txt"
    words = ["이때", "그날 밤", "마침내 그는", "노인은", "우리는", "사람들은", "아이들은", "어머니는"]
    seeds.write_text("\n".join(words) + "\n", encoding="utf-8")
    out, reference = tmp_path / "out", tmp_path / "reference"
    args = ["--num-shards", "4", "--batch-size", "1", "--progress-seconds", "0.01"]
    assert run(argv(tiny_model_dir, seeds, reference, *args)) == 0

    monkeypatch.setattr(generation, "_decode_batch", _marked_failure(tiny_tokenizer, "노인은"))
    with caplog.at_level("INFO", logger="pipelines.generate"):
        assert main(argv(tiny_model_dir, seeds, out, *args)) == 1  # data failed: nothing committed
    assert any("progress:" in r.message and "of 16 rows" in r.message for r in caplog.records)
    info = json.loads((work(out) / "info.json").read_text())
    assert info["status"] == "failed" and not (out / "COMPLETED").exists()
    assert info["units"]["failed"] == 1 and info["units"]["generated"] == 3
    assert "simulated device failure" in info["errors"][0]
    failed = [json.loads(line) for f in work(out).glob("failed-*.jsonl") for line in f.read_text().splitlines()]
    errors = {(f["seed"], f["sample_index"]) for f in failed if f["reason"] == "inference_error"}
    assert errors == {("노인은", 0), ("노인은", 1)}
    held = [f for f in failed if f["reason"] != "inference_error"]  # the failed unit's other rows, held back
    assert all(f["reason"] == "unit_not_committed" for f in held)
    assert info["counts"]["failed_rows"] == len(failed) and info["counts"]["rows"] == 16 - len(failed)
    committed = {p.name: p.stat().st_mtime_ns for p in work(out).glob("generations-*.parquet")}
    assert len(committed) == 3 and len(list((work(out) / "_units").iterdir())) == 3  # the other units committed

    monkeypatch.undo()  # the device is back: the rerun redoes just the failed unit
    assert run(argv(tiny_model_dir, seeds, out, *args)) == 0
    info = json.loads((version(out) / "info.json").read_text())
    assert info["units"]["resumed"] == 3 and info["units"]["generated"] == 1 and info["status"] == "completed"
    done = {p.name: p.stat().st_mtime_ns for p in version(out).glob("generations-*.parquet")}
    assert {k: v for k, v in done.items() if k in committed} == committed
    assert not list(version(out).glob("failed-*.jsonl"))
    ours, ref = all_rows(out), all_rows(reference)
    assert ours.keys() == ref.keys() and all(ours[k]["text"] == ref[k]["text"] for k in ours)


@pytest.mark.slow
def test_a_run_killed_mid_job_resumes_to_exactly_the_rows_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    from conftest import SLOW_GENERATE, make_sentences

    from pipelines.generate import run

    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join(s.split(" 번째")[0][:12] for s in make_sentences(48)) + "\n", encoding="utf-8")
    args = ["--num-shards", "8", "--batch-size", "2", "--num-samples", "2", "--max-new-tokens", "5"]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run(argv(tiny_model_dir, seeds, reference, *args)) == 0

    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_GENERATE, "0.25", *argv(tiny_model_dir, seeds, out, *args, "--lease-seconds", "2")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240

    def units_done() -> int:
        return len(list(out.glob("v-*/_units/*.json")))

    while time.time() < deadline and proc.poll() is None and units_done() < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in work(out).glob("generations-*.parquet")}
    assert 2 <= units_done() < 8, f"the kill should land mid-job: {units_done()} of 8 units committed"
    assert not (out / "COMPLETED").exists()

    # the killed run's lock was never released: refused while its lease lives, taken over once it expired
    assert run(argv(tiny_model_dir, seeds, out, *args)) == 3
    time.sleep(2.1)
    assert run(argv(tiny_model_dir, seeds, out, *args)) == 0
    assert (out / "COMPLETED").exists()
    info = json.loads((version(out) / "info.json").read_text())
    assert info["units"]["resumed"] >= 2 and info["units"]["resumed"] + info["units"]["generated"] == 8
    done = {p.name: p.stat().st_mtime_ns for p in version(out).glob("generations-*.parquet")}
    assert all(done[k] == v for k, v in kept.items() if k in done)  # committed units were not rewritten
    ours, ref = all_rows(out), all_rows(reference)
    assert ours.keys() == ref.keys()  # no duplicates, no gaps
    assert all(ours[k]["text"] == ref[k]["text"] for k in ours)
    assert info["counts"] == json.loads((version(reference) / "info.json").read_text())["counts"]
    assert not list(out.rglob(".tmp-*"))


def test_report_summarizes_a_generation_folder_streaming(first_run, capsys):
    from kogpt2.cli import main
    from kogpt2.gensummary import summarize_generations

    s = summarize_generations(str(first_run), batch_rows=3)
    assert s["rows"] == 12 and s["files"] == 2 and sum(s["finish_reasons"].values()) == 12
    assert s["replacement_chars"] == 0 and s["logprob_mean"]["max"] < 0 and s["info"]["status"] == "completed"
    assert s == summarize_generations(str(first_run), batch_rows=1000)  # batch size changes nothing
    assert main(["report", "--generations", str(first_run)]) == 0
    out = capsys.readouterr().out
    assert "12 rows in 2 files" in out and "seeds in 13, rejected 7" in out
    assert main(["report", "--generations", str(first_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 12
    assert main(["report", "--generations", str(first_run / "nothing")]) == 2


def test_report_reads_a_remote_generation_folder(first_run):
    """Through a filesystem that needs no network (TensorFlow's ram://), as it would read gs://."""
    import tensorflow as tf

    from kogpt2.gensummary import summarize_generations

    remote = "ram://generations/run1"
    for f in first_run.rglob("*"):
        if f.is_file() and f.name != ".kogpt2-cas":
            tf.io.gfile.makedirs(f"{remote}/{f.parent.relative_to(first_run)}".rstrip("/."))
            tf.io.gfile.copy(str(f), f"{remote}/{f.relative_to(first_run)}", overwrite=True)
    here, there = summarize_generations(str(first_run)), summarize_generations(remote)
    assert {**there, "folder": None} == {**here, "folder": None}


def test_a_run_writes_its_settings_and_config_file_repeats_it(first_run, tiny_model_dir, seeds_dir, tmp_path):
    from pipelines.generate import parse_args, run

    settings = json.loads((version(first_run) / "job.json").read_text())
    assert settings["top_p"] == 0.9 and settings["num_samples"] == 2 and settings["num_shards"] == 2
    assert settings["model"] == str(tiny_model_dir) and settings["strategy"] == "sample"
    job, _ = parse_args(["--config", str(version(first_run) / "job.json")])
    assert job.settings() == settings  # the file alone gives the same job
    again = dict(settings, output=str(tmp_path / "again"))
    (tmp_path / "job.json").write_text(json.dumps(again))
    assert run(["--config", str(tmp_path / "job.json")]) == 0
    ours, reference = all_rows(tmp_path / "again"), all_rows(first_run)
    assert ours.keys() == reference.keys() and all(ours[k]["text"] == reference[k]["text"] for k in ours)
    job, _ = parse_args(["--config", str(tmp_path / "job.json"), "--top-p", "0.5", "--num_shards", "3"])
    assert (job.config.top_p, job.num_shards, job.config.num_samples) == (0.5, 3, 2)  # flags override the file
    (tmp_path / "bad.json").write_text(json.dumps({**settings, "top_pp": 0.5}))
    with pytest.raises(ValueError, match="'top_pp' is not a setting; did you mean 'top_p'"):
        parse_args(["--config", str(tmp_path / "bad.json")])


@pytest.mark.slow
def test_one_model_shared_by_the_worker_processes_gives_the_same_rows(first_run, tiny_model_dir, seeds_dir, tmp_path):
    """--share-model-across-processes: the model lives in one server process (Beam's multi_process_shared)."""
    from pipelines.generate import run

    out = tmp_path / "shared"
    assert run(argv(tiny_model_dir, seeds_dir / "*", out, "--share-model-across-processes")) == 0
    ours, reference = all_rows(out), all_rows(first_run)
    assert ours.keys() == reference.keys() and all(ours[k]["text"] == reference[k]["text"] for k in ours)


def test_the_unit_layout_in_the_signature_changes_with_the_length_buckets():
    """Other buckets put rows in other units: a folder cut by other buckets must not be resumed into."""
    from kogpt2.generation import PROMPT_BUCKETS
    from pipelines.generate_units import UNIT_LAYOUT

    assert UNIT_LAYOUT == "prompt-length:" + ",".join(map(str, PROMPT_BUCKETS))


def test_units_hold_rows_of_similar_prompt_length_in_balanced_stable_shares():
    """The decoder ends each length bucket of a unit with a partial batch: few buckets per unit."""
    from collections import Counter

    from pipelines.generate_units import UnitLayout, length_class, unit_of

    assert [length_class(n) for n in (1, 4, 5, 8, 9, 16, 17, 100, 5000)] == [4, 4, 8, 8, 16, 16, 32, 128, 2048]
    classes = {8: 900, 16: 90, 32: 10}  # output rows per class, as in real seeds (mostly short)
    layout = UnitLayout.of(classes, 4)
    rows = [(f"{k}:{i}", k) for k, n in classes.items() for i in range(n)]
    placed = [(layout.unit_of(row_id, k), k) for row_id, k in rows]
    # the line of 1,000 rows cut in 4: class 8 fills units 0-3 (900 rows), 16 and 32 share unit 3
    assert {k: sorted({u for u, kk in placed if kk == k}) for k in classes} == {8: [0, 1, 2, 3], 16: [3], 32: [3]}
    sizes = Counter(u for u, _ in placed)
    assert all(abs(sizes[u] - 250) < 60 for u in range(4)), sizes  # balanced up to hash noise
    # 6 (unit, bucket) pairs, each at most one partial batch; a plain hash of the id puts every class in every unit
    assert len(set(placed)) == 6
    assert len({(unit_of(row_id, 4), k) for row_id, k in rows}) == 12
    # the same input is laid out the same way in another process, whatever the order the counts arrive in
    again = UnitLayout.of(dict(reversed(list(classes.items()))), 4)
    assert [again.unit_of(row_id, k) for row_id, k in rows] == [u for u, _ in placed]
    # one class, or more units than rows: every row still lands in range
    assert {UnitLayout.of({8: 3}, 5).unit_of(f"r{i}", 8) for i in range(3)} <= set(range(5))
    assert {UnitLayout.of({8: 1000}, 1).unit_of(f"r{i}", 8) for i in range(1000)} == {0}
