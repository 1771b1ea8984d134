"""The output folder as a scheduler meets it: byte-identical reruns, refusals, failed rebuilds, spans, status."""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, make_sentences
from preprocess_helpers import (
    argv,
    check_folder,
    current,
    folder_state,
    is_completed,
    read_info,
    read_split,
    shard_bytes,
)

from kogpt2 import outputs, records
from pipelines import preprocess
from pipelines.preprocess import PreprocessConfig
from pipelines.shards import spill, writer


def test_reruns_and_two_workers_write_identical_shards(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    sentences = make_sentences(120)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(sentences[:50] + sentences[:5] * 3) + "\n", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("\n".join(sentences[50:100]) + "\n", encoding="utf-8")
    (tmp_path / "in" / "c.txt.gz").write_bytes(gzip.compress(("\n".join(sentences[100:]) + "\n").encode()))
    inputs = [tmp_path / "in" / "*.txt", tmp_path / "in" / "*.gz"]
    flags = ("--num-shards", "3", "--val-fraction", "0.4", "--max-len", "40")
    first, multi, tiny_runs = tmp_path / "first", tmp_path / "multi", tmp_path / "tiny-runs"

    assert preprocess.run(argv(inputs, tiny_tokenizer, first, *flags)) == 0
    reference = shard_bytes(first)
    info = read_info(first)
    check_folder(first, info)
    assert info["shards"]["train"] == [records.shard_name("train", i, 3) for i in range(3)]
    assert info["shards"]["validation"] == [records.shard_name("validation", i, 2) for i in range(2)]  # 3 x 0.4 / 0.6
    assert len(reference) == 5
    assert info["counts"]["lines_read"] == 135 and info["counts"]["kept"] == 135
    assert info["counts"]["truncated"] == 0  # so distinct sentences give distinct examples

    # duplicates (no --dedup) never straddle the split
    val = Counter(tuple(ids) for ids, _ in read_split(first, info, "validation"))
    train = Counter(tuple(ids) for ids, _ in read_split(first, info, "train"))
    assert not set(val) & set(train) and sum(val.values()) + sum(train.values()) == 135

    # the same run again with --overwrite: rebuilt as a new version, byte-identical
    old = current(first)
    assert preprocess.run(argv(inputs, tiny_tokenizer, first, *flags, "--overwrite")) == 0
    assert current(first) != old and shard_bytes(first) == reference

    # many tiny sorted runs merged in several rounds: same bytes
    monkeypatch.setattr(spill, "MAX_FANIN", 2)
    assert (
        preprocess.run(argv(inputs, tiny_tokenizer, tiny_runs, *flags, "--spill-mb", "0.002", "--batch-size", "7")) == 0
    )
    assert shard_bytes(tiny_runs) == reference

    # two worker processes, through the command: same bytes, same fingerprint
    cmd = [
        sys.executable,
        "-m",
        "pipelines.preprocess",
        *argv(inputs, tiny_tokenizer, multi, *flags),
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_bytes(multi) == reference
    assert read_info(multi)["data_fingerprint"] == info["data_fingerprint"]


def test_output_folder_of_another_run_is_refused_unless_overwrite(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_sentences(30)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert preprocess.run(argv([src], tiny_tokenizer, out)) == 0
    before = folder_state(out)
    first = read_info(out)
    assert preprocess.run(argv([src], tiny_tokenizer, out, "--max-len", "12")) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "flags.max_len: 30 -> 12" in err
    assert folder_state(out) == before
    assert preprocess.run(argv([src], tiny_tokenizer, out, "--max-len", "12", "--overwrite")) == 0
    info = read_info(out)
    assert info["max_len"] == 12
    assert info["data_fingerprint"] != first["data_fingerprint"]
    # the previous version is kept (--keep-versions 2) and still whole
    versions = outputs.read_manifest(str(out))[0].versions  # type: ignore[index]
    assert [v["version"] for v in versions] == [2, 1]
    old = outputs.open_committed(str(out / versions[1]["folder"]), verify="full")
    assert json.loads(old.read("info.json"))["data_fingerprint"] == first["data_fingerprint"]


def test_a_rerun_leaves_the_current_version_untouched_until_it_commits(
    tmp_path: Path, tiny_tokenizer, capsys, monkeypatch
) -> None:
    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_sentences(40)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert preprocess.run(argv([src], tiny_tokenizer, out, "--num-shards", "2")) == 0
    finished = folder_state(out)
    assert "COMPLETED" in finished and "train-00001-of-00002.tfrecord.gz" in shard_bytes(out)
    capsys.readouterr()

    # the same run again: reported complete, nothing run, rewritten or deleted
    assert preprocess.run(argv([src], tiny_tokenizer, out, "--num-shards", "2")) == 0
    assert "already complete" in capsys.readouterr().out
    assert folder_state(out) == finished

    # the corpus changed (appended to): a different run, refused without --overwrite
    with src.open("a", encoding="utf-8") as f:
        f.write("새로 들어온 문장이 하나 있었다.\n")
    assert preprocess.run(argv([src], tiny_tokenizer, out, "--num-shards", "2")) == 2
    assert "file_stats" in capsys.readouterr().err
    assert folder_state(out) == finished

    # --overwrite: while the new run writes its shards, every file of the current version is there, unchanged
    seen: list[dict[str, Any]] = []
    write = writer.write_tfrecord
    old_root = current(out)

    def watching(path: str, examples: Any) -> dict[str, Any]:
        seen.append({k: v for k, v in folder_state(out).items() if k in finished})
        assert current(out) == old_root  # readers still get the old version
        return write(path, examples)

    monkeypatch.setattr(writer, "write_tfrecord", watching)
    assert preprocess.run(argv([src], tiny_tokenizer, out, "--max-len", "12", "--overwrite")) == 0
    assert seen and all(state == finished for state in seen)
    info = read_info(out)
    assert info["max_len"] == 12 and info["counts"]["lines_read"] == 41
    check_folder(out, info)

    # a run that fails leaves the current version as it was, and committed nothing
    committed = folder_state(out)

    def failing(path: str, examples: Any) -> dict[str, Any]:
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_tfrecord", failing)
    capsys.readouterr()
    assert preprocess.run(argv([src], tiny_tokenizer, out, "--max-len", "14", "--overwrite")) == 5
    assert "disk full" in capsys.readouterr().err
    now = folder_state(out)
    assert {k: v for k, v in now.items() if k in committed} == committed
    assert read_info(out)["max_len"] == 12


def test_empty_train_split_is_an_error_unless_allowed(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    src = tmp_path / "utf16.txt"
    src.write_text("\n".join(make_sentences(20)) + "\n", encoding="utf-16")  # read as UTF-8: all rejected
    out = tmp_path / "out"
    assert preprocess.run(argv([src], tiny_tokenizer, out)) == 1
    err = capsys.readouterr().err
    assert "no train and validation examples" in err and "--allow-empty" in err and "rejected 20" in err
    assert not is_completed(str(out))
    pending = outputs.read_pending(str(out))
    assert pending is not None
    info = json.loads((out / pending.work / "info.json").read_text())  # the counts stay readable
    assert info["counts"]["rejected"] == 20 and info["counts"]["examples"] == {"train": 0, "validation": 0}
    allowed = tmp_path / "allowed"
    assert preprocess.run(argv([src], tiny_tokenizer, allowed, "--allow-empty")) == 0
    assert is_completed(str(allowed))
    # with --val-fraction 0 only train is needed
    one = tmp_path / "one.txt"
    one.write_text(make_sentences(1)[0] + "\n", encoding="utf-8")
    assert preprocess.run(argv([one], tiny_tokenizer, tmp_path / "one", "--val-fraction", "0")) == 0


def test_a_failed_or_empty_rebuild_keeps_the_current_version(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(make_sentences(30)) + "\n", encoding="utf-8")
    bad.write_text("\n".join(make_sentences(10)) + "\n", encoding="utf-16")  # every line undecodable
    out = tmp_path / "out"
    assert preprocess.run(argv([good], tiny_tokenizer, out)) == 0
    committed = folder_state(out)
    # an --overwrite rebuild from an export that came out empty: exit 1, the good version stays current
    assert preprocess.run(argv([bad], tiny_tokenizer, out, "--overwrite")) == 1
    assert "nothing was committed" in capsys.readouterr().err.lower()
    assert {k: v for k, v in folder_state(out).items() if k in committed} == committed
    assert read_info(out)["counts"]["kept"] == 30
    check_folder(out, read_info(out))
    # a truncated .gz (an interrupted upload): exit 1, the previous version stays current
    whole = gzip.compress(("\n".join(make_sentences(400)) + "\n").encode())
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    assert preprocess.run(argv([cut], tiny_tokenizer, out, "--overwrite")) == 1
    assert read_info(out)["counts"]["kept"] == 30
    status = outputs.status(str(out))
    assert status["complete"] and status["current"]["version"] == 1 and status["pending"] is not None


def test_a_daily_span_reads_only_the_files_that_arrived_since(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    sentences = make_sentences(90)
    (incoming / "day1.txt").write_text("\n".join(sentences[:30]) + "\n", encoding="utf-8")
    spans = tmp_path / "spans"
    common = ["--tokenizer", str(tiny_tokenizer.path), "--input", str(incoming / "*.txt")]
    span = ["--exclude-inputs-of", str(spans / "span-*")]
    assert preprocess.run([*common, "--output", str(spans / "span-1")]) == 0
    (incoming / "day2.txt").write_text("\n".join(sentences[30:60]) + "\n", encoding="utf-8")
    assert preprocess.run([*common, *span, "--output", str(spans / "span-2")]) == 0
    assert read_info(spans / "span-2")["inputs"] == [str(incoming / "day2.txt")]
    # nothing new: exit 0, no folder written
    capsys.readouterr()
    assert preprocess.run([*common, *span, "--output", str(spans / "span-3")]) == 0
    assert "nothing new" in capsys.readouterr().out and not (spans / "span-3").exists()
    # a file already read that changed since: refused, never read twice or skipped silently
    with (incoming / "day1.txt").open("a", encoding="utf-8") as f:
        f.write(sentences[60] + "\n")
    assert preprocess.run([*common, *span, "--output", str(spans / "span-3")]) == 2
    assert "changed since" in capsys.readouterr().err
    # the spans train as one data set
    from kogpt2.dataset import open_shards

    both = open_shards(str(spans / "span-*"))
    assert both.num_examples("train") + both.num_examples("validation") == 60


def test_status_command_says_what_a_scheduler_needs(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    from kogpt2.cli import main

    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_sentences(30)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["status", str(out)]) == 1  # nothing committed yet
    assert "not complete" in capsys.readouterr().out
    with outputs.Lease(str(out), "preprocess"):
        assert main(["status", str(out)]) == 3  # a run holds it: poll again later
        assert "lock: preprocess" in capsys.readouterr().out
    assert preprocess.run(argv([src], tiny_tokenizer, out)) == 0
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["complete"] and s["current"]["job"] == "preprocess" and s["current"]["summary"]["lines_read"] == 30
    assert s["current"]["files"] == len(outputs.read_manifest(str(out))[0].files)  # type: ignore[index]
    assert main(["status", str(out), "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(current(out))


def test_run_config_says_how_the_run_ended(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:

    from pipelines.preprocess import PreprocessStatus

    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_sentences(30)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    config = PreprocessConfig(inputs=(str(src),), tokenizer=str(tiny_tokenizer.path), output=str(out))
    # a run that fails leaves its work folder; the same run again resumes it
    real_write = writer.write_tfrecord

    def failing(path: str, examples: Any) -> dict[str, Any]:
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_tfrecord", failing)
    with pytest.raises(OSError, match="disk full"):
        preprocess.run_config(config)
    monkeypatch.setattr(writer, "write_tfrecord", real_write)
    first = preprocess.run_config(config)
    assert first.status is PreprocessStatus.RESUMED and first.version == 1
    assert first.version_path is not None and Path(first.version_path) == current(out)
    assert first.info == read_info(out) and first.counts["lines_read"] == 30
    assert first.report()[-1] == f"committed {out} version 1: {first.version_path}"
    again = preprocess.run_config(config)
    assert again.status is PreprocessStatus.ALREADY_COMPLETE and again.info == first.info and again.version == 1
    assert "already complete" in again.report()[0]
    rebuilt = preprocess.run_config(dataclasses.replace(config, overwrite=True))
    assert rebuilt.status is PreprocessStatus.NEW and rebuilt.version == 2 and rebuilt.info == first.info
    span = tmp_path / "span-2"
    later = preprocess.run_config(dataclasses.replace(config, output=str(span), exclude_inputs_of=(str(out),)))
    assert later.status is PreprocessStatus.NOTHING_NEW and later.info is None and later.counts == {}
    assert str(out) in later.detail and later.report() == [f"{later.detail}; no folder written"]
    assert not span.exists()
