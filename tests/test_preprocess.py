"""The preprocessing pipeline: real Beam runs on small files, read back with tf.data."""

from __future__ import annotations

import codecs
import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that
from conftest import REPO, make_sentences

from kogpt2 import outputs, records
from kogpt2.outputs import COMPLETED_FILE, MANIFEST_FILE
from kogpt2.schemas import tf_feature_spec, validate_info
from kogpt2.text import escape_bytes, normalize_text, split_sentences, unescape_bytes
from pipelines import preprocess
from pipelines.counters import NAMESPACE
from pipelines.preprocess import PreprocessConfig, build_pipeline, parse_args
from pipelines.shards import spill, textio, writer

# --- helpers ---------------------------------------------------------------------------


def current(out: Path) -> Path:
    """The committed version folder of an output folder (what its COMPLETED manifest names)."""
    return Path(outputs.open_committed(str(out)).root)


def is_completed(out: Path | str) -> bool:
    return outputs.read_manifest(str(out)) is not None


def read_info(out: Path) -> dict[str, Any]:
    return json.loads((current(out) / "info.json").read_text())


def built(p, config: PreprocessConfig):  # type: ignore[no-untyped-def]
    """The preprocessing steps on a test pipeline, claiming ``config.output`` as the command does."""
    plan = preprocess.make_plan(config)
    lease = outputs.Lease(config.output, preprocess.JOB).acquire()
    claim = outputs.begin(config.output, preprocess.JOB, preprocess.signature(config, plan), lease)
    preprocess.prepare_work(plan, claim)
    return build_pipeline(p, config, plan, claim)


def read_split(folder: Path, info: dict[str, Any], split: str) -> list[tuple[list[int], int]]:
    """The examples of one split of an output folder, shard by shard in file order, via tf.data."""
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    if (folder / COMPLETED_FILE).exists():
        folder = current(folder)
    files = [str(folder / name) for name in info["shards"][split]]
    if not files:
        return []
    spec = tf_feature_spec(info["max_len"])
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").map(lambda x: tf.io.parse_single_example(x, spec))
    return [(e["input_ids"].numpy().tolist(), int(e["length"].numpy())) for e in ds]


def expected_examples(tok, texts: list[str], max_len: int, overflow: str = "truncate") -> Counter:
    """What the shards must hold for these normalized texts, by the pure functions."""
    out: Counter = Counter()
    for text in texts:
        framed = records.frame(tok.encode(text), tok.bos_id, tok.eos_id)
        for piece in records.fit(framed, max_len, overflow):
            ids, length = records.pad(piece, max_len, tok.pad_id)
            out[(tuple(ids), length)] += 1
    return out


def as_counter(examples: list[tuple[list[int], int]]) -> Counter:
    return Counter((tuple(ids), length) for ids, length in examples)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(current(out).glob("*.tfrecord.gz"))}


def argv(inputs: list[Path] | list[str], tok, out: Path, *extra: str) -> list[str]:
    args = []
    for i in inputs:
        args += ["--input", str(i)]
    return [*args, "--tokenizer", str(tok.path if hasattr(tok, "path") else tok), "--output", str(out), *extra]


def check_accounting(info: dict[str, Any]) -> None:
    c = info["counts"]
    assert c["lines_read"] == c["kept"] + sum(c["filtered"].values()) + c["rejected"]


def check_folder(out: Path, info: dict[str, Any]) -> None:
    """Shards listed, info valid, no spill files left, the version holds exactly its manifest, COMPLETED last."""
    validate_info(info)
    done = outputs.open_committed(str(out), job="preprocess", verify="full")
    root = Path(done.root)
    names = {p.name for p in root.iterdir()}
    listed = set(info["shards"]["train"]) | set(info["shards"]["validation"])
    assert listed == {n for n in names if n.endswith(".tfrecord.gz")}
    assert not [n for n in names if n.startswith(spill.SPILL_PREFIX)]
    assert names - {MANIFEST_FILE} == set(done.manifest.files)
    committed = (out / COMPLETED_FILE).stat().st_mtime_ns
    assert all((root / n).stat().st_mtime_ns <= committed for n in names)


# --- configuration and flags -----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_len", 2, "max_len=2"),
        ("val_fraction", 1.0, "val_fraction=1.0"),
        ("val_fraction", -0.1, "val_fraction=-0.1"),
        ("min_chars", -1, "min_chars=-1"),
        ("encoding", "klingon-8", "klingon-8"),
        ("encoding", "utf-16", "ASCII-compatible"),
        ("overflow", "wrap", "overflow='wrap'"),
        ("num_shards", -2, "num_shards=-2"),
        ("spill_mb", 0, "spill_mb=0"),
        ("inputs", (), "inputs=()"),
    ],
)
def test_config_refuses_nonsense_naming_the_field(field: str, value: Any, message: str) -> None:
    kwargs: dict[str, Any] = {"inputs": ("a.txt",), "tokenizer": "t.spiece", "output": "out", field: value}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PreprocessConfig(**kwargs)


def test_parse_args_splits_our_flags_from_beams() -> None:
    config, beam_args = parse_args(
        [
            "--input",
            "a.txt",
            "--input",
            "b/*.txt",
            "--tokenizer",
            "t",
            "--output",
            "o",
            "--max-len",
            "40",
            "--encoding",
            "EUC-KR",
            "--packing",
            "--runner",
            "DirectRunner",
            "--direct_num_workers=2",
        ]
    )
    assert config.inputs == ("a.txt", "b/*.txt") and config.max_len == 40 and config.packing
    assert config.encoding == "euc_kr"
    assert beam_args == ["--runner", "DirectRunner", "--direct_num_workers=2"]


def test_parse_args_takes_both_spellings_and_refuses_unknown_flags() -> None:
    base = ["--input", "a", "--tokenizer", "t", "--output", "o"]
    assert parse_args([*base, "--max_len", "5", "--val_fraction", "0.2"])[0].max_len == 5  # --max-len or --max_len
    with pytest.raises(ValueError, match=r"unknown option --max-lenn; did you mean --max-len\?"):
        parse_args([*base, "--max-lenn", "5"])
    with pytest.raises(ValueError, match="missing --input, --output"):
        parse_args(["--tokenizer", "t"])


# --- pipelines -------------------------------------------------------------------------


def test_pipeline_filters_rejects_dedups_and_writes_shards(tmp_path: Path, tiny_tokenizer, test_pipeline) -> None:
    sentences = make_sentences(60)
    a = tmp_path / "a.txt"
    a_lines = [s.encode() for s in sentences[:30]] + [
        b"",  # empty
        b"  \t \xe2\x80\x8b ",  # whitespace and a zero-width space: empty
        "가나".encode(),  # too short for min_chars=3
        sentences[0].encode(),  # exact duplicate
        ("  " + sentences[1].replace(" ", "\u3000") + "\u200b").encode(),  # a duplicate once normalized
        b"\xff\xfe not utf-8",  # undecodable
    ]
    a.write_bytes(codecs.BOM_UTF8 + b"\n".join(a_lines) + b"\n")
    b = tmp_path / "b.txt"
    b.write_text("\n".join(sentences[30:]), encoding="utf-8")  # no final newline
    out = tmp_path / "out"
    out.mkdir()
    config = PreprocessConfig(
        inputs=(str(tmp_path / "*.txt"),),
        tokenizer=str(tiny_tokenizer.path),
        output=str(out),
        max_len=16,
        val_fraction=0.3,
        min_chars=3,
        dedup=True,
    )

    def check(infos: list[dict[str, Any]]) -> None:
        assert len(infos) == 1
        c = infos[0]["counts"]
        assert c["lines_read"] == 66 and c["rejected"] == 1 and c["kept"] == 60
        assert c["filtered"] == {"empty": 2, "too_short": 1, "duplicate": 2}
        assert c["examples"]["train"] + c["examples"]["validation"] == 60

    assert_that(built(test_pipeline, config), check)
    result = test_pipeline.run()
    result.wait_until_finish()

    info = read_info(out)
    check_folder(out, info)
    check_accounting(info)
    # Beam counters carry the same figures as info.json
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters = {m.key.metric.name: m.committed for m in query["counters"]}
    c = info["counts"]
    assert counters["lines_read"] == c["lines_read"] and counters["rejected"] == c["rejected"]
    assert counters["kept"] == c["kept"] and counters["truncated"] == c["truncated"]
    for reason, n in c["filtered"].items():
        assert counters[f"filtered_{reason}"] == n
    train, val = read_split(out, info, "train"), read_split(out, info, "validation")
    assert as_counter(train + val) == expected_examples(tiny_tokenizer, sentences, 16)
    assert all(ids[0] == tiny_tokenizer.bos_id for ids, _ in train + val)
    assert all(ids[n:] == [tiny_tokenizer.pad_id] * (16 - n) for ids, n in train + val)
    by_split = {
        split: expected_examples(
            tiny_tokenizer, [s for s in sentences if records.assign_split(records.stable_hash(s), 0.3) == split], 16
        )
        for split in records.SPLITS
    }
    assert as_counter(val) == by_split["validation"] and len(val) > 0
    framed = [len(tiny_tokenizer.encode(s)) + 2 for s in sentences]
    assert info["counts"]["truncated"] == sum(n > 16 for n in framed) > 0
    assert info["counts"]["tokens"]["train"] == sum(n for _, n in train)
    rejected = [json.loads(line) for line in (current(out) / preprocess.REJECTED_FILE).read_text().splitlines()]
    assert rejected == [
        {
            "file": str(a),
            "line": 36,
            "reason": "undecodable",
            "detail": rejected[0]["detail"],
            "raw": escape_bytes(b"\xff\xfe not utf-8"),
        }
    ]
    assert "utf-8" in rejected[0]["detail"]
    assert c["rejected_by_reason"] == {"undecodable": 1, "too_long": 0} and c["corrupt_inputs"] == []


def test_cp949_corpus_and_undecodable_line(tmp_path: Path, tiny_tokenizer) -> None:
    sentences = make_sentences(20)
    src = tmp_path / "cp949.txt"
    src.write_bytes(
        b"\r\n".join(
            [s.encode("cp949") for s in sentences[:10]]
            + [b"\x80\x80 broken"]
            + [s.encode("cp949") for s in sentences[10:]]
        )
        + b"\r\n"
    )
    out = tmp_path / "out"
    assert preprocess.main(argv([src], tiny_tokenizer, out, "--encoding", "cp949", "--max-len", "64")) == 0
    info = read_info(out)
    assert info["encoding"] == "cp949"
    assert info["counts"]["rejected"] == 1 and info["counts"]["kept"] == 20
    examples = read_split(out, info, "train") + read_split(out, info, "validation")
    assert as_counter(examples) == expected_examples(tiny_tokenizer, sentences, 64)
    assert {tiny_tokenizer.decode(ids[:n]) for ids, n in examples} == set(sentences)
    (rejected,) = [json.loads(x) for x in (current(out) / preprocess.REJECTED_FILE).read_text().splitlines()]
    assert rejected["line"] == 11 and rejected["raw"] == "\\x80\\x80 broken"
    # the shards' tokenizer is copied beside them, so training a preset needs no --tokenizer
    from kogpt2.tokenizer import load_tokenizer

    assert load_tokenizer(current(out)).fingerprint == tiny_tokenizer.fingerprint == info["tokenizer"]["fingerprint"]


def test_reruns_and_two_workers_write_identical_shards(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    sentences = make_sentences(120)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(sentences[:50] + sentences[:5] * 3) + "\n", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("\n".join(sentences[50:100]) + "\n", encoding="utf-8")
    (tmp_path / "in" / "c.txt.gz").write_bytes(gzip.compress(("\n".join(sentences[100:]) + "\n").encode()))
    inputs = [tmp_path / "in" / "*.txt", tmp_path / "in" / "*.gz"]
    flags = ("--num-shards", "3", "--val-fraction", "0.4", "--max-len", "40")
    first, multi, tiny_runs = tmp_path / "first", tmp_path / "multi", tmp_path / "tiny-runs"

    assert preprocess.main(argv(inputs, tiny_tokenizer, first, *flags)) == 0
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
    assert preprocess.main(argv(inputs, tiny_tokenizer, first, *flags, "--overwrite")) == 0
    assert current(first) != old and shard_bytes(first) == reference

    # many tiny sorted runs merged in several rounds: same bytes
    monkeypatch.setattr(spill, "MAX_FANIN", 2)
    assert (
        preprocess.main(argv(inputs, tiny_tokenizer, tiny_runs, *flags, "--spill-mb", "0.002", "--batch-size", "7"))
        == 0
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
    assert preprocess.main(argv([src], tiny_tokenizer, out)) == 0
    before = folder_state(out)
    first = read_info(out)
    assert preprocess.main(argv([src], tiny_tokenizer, out, "--max-len", "12")) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "flags.max_len: 30 -> 12" in err
    assert folder_state(out) == before
    assert preprocess.main(argv([src], tiny_tokenizer, out, "--max-len", "12", "--overwrite")) == 0
    info = read_info(out)
    assert info["max_len"] == 12
    assert info["data_fingerprint"] != first["data_fingerprint"]
    # the previous version is kept (--keep-versions 2) and still whole
    versions = outputs.read_manifest(str(out))[0].versions  # type: ignore[index]
    assert [v["version"] for v in versions] == [2, 1]
    old = outputs.open_committed(str(out / versions[1]["folder"]), verify="full")
    assert json.loads(old.read("info.json"))["data_fingerprint"] == first["data_fingerprint"]


def folder_state(out: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``out`` but the lock: (inode, mtime_ns, bytes); a rewritten file has a new inode."""
    files = [p for p in out.rglob("*") if p.is_file() and p.name not in (".lock", ".kogpt2-cas")]
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_a_rerun_leaves_the_current_version_untouched_until_it_commits(
    tmp_path: Path, tiny_tokenizer, capsys, monkeypatch
) -> None:
    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_sentences(40)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert preprocess.main(argv([src], tiny_tokenizer, out, "--num-shards", "2")) == 0
    finished = folder_state(out)
    assert "COMPLETED" in finished and "train-00001-of-00002.tfrecord.gz" in shard_bytes(out)
    capsys.readouterr()

    # the same run again: reported complete, nothing run, rewritten or deleted
    assert preprocess.main(argv([src], tiny_tokenizer, out, "--num-shards", "2")) == 0
    assert "already complete" in capsys.readouterr().out
    assert folder_state(out) == finished

    # the corpus changed (appended to): a different run, refused without --overwrite
    with src.open("a", encoding="utf-8") as f:
        f.write("새로 들어온 문장이 하나 있었다.\n")
    assert preprocess.main(argv([src], tiny_tokenizer, out, "--num-shards", "2")) == 2
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
    assert preprocess.main(argv([src], tiny_tokenizer, out, "--max-len", "12", "--overwrite")) == 0
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
    assert preprocess.main(argv([src], tiny_tokenizer, out, "--max-len", "14", "--overwrite")) == 5
    assert "disk full" in capsys.readouterr().err
    now = folder_state(out)
    assert {k: v for k, v in now.items() if k in committed} == committed
    assert read_info(out)["max_len"] == 12


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-len", "2"], "max_len=2"),
        (["--val-fraction", "1"], "val_fraction=1.0"),
        (["--min-chars", "-1"], "min_chars=-1"),
        (["--encoding", "klingon-8"], "klingon-8"),
        (["--encoding", "iso2022_kr"], "stateful encoding"),
        (["--encoding", "utf-7"], "stateful encoding"),
        (["--max-line-bytes", "0"], "max_line_bytes=0"),
        (["--bogus-flag", "1"], "--bogus-flag"),
    ],
)
def test_nonsense_flags_exit_2_and_write_nothing(
    tmp_path: Path, tiny_tokenizer, capsys, extra: list[str], message: str
) -> None:
    src = tmp_path / "a.txt"
    src.write_text("그는 웃었다.\n", encoding="utf-8")
    out = tmp_path / "out"
    assert preprocess.main(argv([src], tiny_tokenizer, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_tokenizer_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    src = tmp_path / "a.txt"
    src.write_text("그는 웃었다.\n", encoding="utf-8")
    bad = tmp_path / "bad.spiece"
    bad.write_bytes(b"not a sentencepiece model")
    out = tmp_path / "out"
    assert preprocess.main(argv([src], bad, out)) == 2
    assert "bad.spiece" in capsys.readouterr().err
    assert not out.exists()


def test_empty_glob_fails_the_command(tmp_path: Path, tiny_tokenizer) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.preprocess", *argv([tmp_path / "nothing-*.txt"], tiny_tokenizer, out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "nothing-*.txt" in proc.stderr and "matches no file" in proc.stderr
    assert not out.exists()


def test_packing_fills_blocks_deterministically(tmp_path: Path, tiny_tokenizer) -> None:
    sentences = make_sentences(80)
    src = tmp_path / "a.txt"
    src.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out, again = tmp_path / "out", tmp_path / "again"
    flags = ("--packing", "--max-len", "16", "--num-shards", "2", "--val-fraction", "0.25")
    assert preprocess.main(argv([src], tiny_tokenizer, out, *flags)) == 0
    assert preprocess.main(argv([src], tiny_tokenizer, again, *flags)) == 0
    assert shard_bytes(out) == shard_bytes(again)
    info = read_info(out)
    check_folder(out, info)
    tok = tiny_tokenizer
    framed = Counter(tuple(records.frame(tok.encode(s), tok.bos_id, tok.eos_id)) for s in sentences)
    got: Counter = Counter()
    blocks = 0
    for split in records.SPLITS:
        for name in info["shards"][split]:
            shard = read_split(out, {**info, "shards": {split: [name]}}, split)
            blocks += len(shard)
            assert all(n == 16 for _, n in shard[:-1])  # only a shard's last block is partial
            stream = [t for ids, n in shard for t in ids[:n]]
            while stream:  # the stream splits back into the <s> ... </s> sentences
                end = stream.index(tok.eos_id) + 1
                got[tuple(stream[:end])] += 1
                del stream[:end]
    assert got == framed
    tokens = sum(len(f) * k for f, k in framed.items())
    assert sum(info["counts"]["tokens"].values()) == tokens
    assert info["counts"]["packing_efficiency"] == pytest.approx(tokens / (blocks * 16))
    assert info["counts"]["truncated"] == 0


def test_window_overflow_keeps_every_token(tmp_path: Path, tiny_tokenizer, test_pipeline) -> None:
    sentences = make_sentences(40)
    src = tmp_path / "a.txt"
    src.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    config = PreprocessConfig(
        inputs=(str(src),),
        tokenizer=str(tiny_tokenizer.path),
        output=str(out),
        max_len=8,
        overflow="window",
        val_fraction=0.0,
    )
    with test_pipeline as p:
        built(p, config)
    info = read_info(out)
    assert info["shards"]["validation"] == [] and info["counts"]["examples"]["validation"] == 0
    examples = read_split(out, info, "train")
    assert as_counter(examples) == expected_examples(tiny_tokenizer, sentences, 8, "window")
    assert info["counts"]["windowed"] == sum(len(tiny_tokenizer.encode(s)) + 2 > 8 for s in sentences) > 0
    assert info["counts"]["truncated"] == 0


def test_split_sentences_counts_lines_and_sentences(tmp_path: Path, tiny_tokenizer, test_pipeline) -> None:
    s = make_sentences(12)
    paragraphs = [
        f"{s[0]} {s[1]} {s[2]}",
        f'{s[3]} "왜? 어서 가." 하고 물었다. {s[4]}',
        f"{s[0]} 응.",  # s[0] repeats and "응." is too short: nothing left, the line counts as a duplicate
        f"{s[5]}",
        "아.",  # too short
        f"{s[6]} {s[7]} {s[8]} {s[9]} {s[10]} {s[11]}",
    ]
    src = tmp_path / "p.txt"
    src.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    config = PreprocessConfig(
        inputs=(str(src),),
        tokenizer=str(tiny_tokenizer.path),
        output=str(out),
        split_sentences=True,
        min_chars=3,
        dedup=True,
        max_len=40,
    )
    with test_pipeline as p:
        built(p, config)
    info = read_info(out)
    check_accounting(info)
    c = info["counts"]
    assert c["lines_read"] == 6 and c["kept"] == 4
    assert c["filtered"] == {"empty": 0, "too_short": 1, "duplicate": 1}
    expected_sentences = sorted(
        {x for para in paragraphs for x in split_sentences(normalize_text(para)) if len(x) >= 3}
    )
    split = sum(len(split_sentences(normalize_text(para))) for para in paragraphs)
    assert split == 16
    assert c["sentences"] == {"split": split, "too_short": 2, "duplicate": 1, "kept": len(expected_sentences)}
    examples = read_split(out, info, "train") + read_split(out, info, "validation")
    assert as_counter(examples) == expected_examples(tiny_tokenizer, expected_sentences, 40)


@pytest.mark.shared_data
def test_real_tokenizer_and_novel(tmp_path: Path, v1_tokenizer_path: Path, novel_path: Path) -> None:
    from kogpt2.tokenizer import load_tokenizer

    tok = load_tokenizer(v1_tokenizer_path)
    out = tmp_path / "out"
    assert preprocess.main(argv([novel_path], v1_tokenizer_path, out)) == 0
    info = read_info(out)
    check_folder(out, info)
    c = info["counts"]
    assert c["lines_read"] == 284 and c["kept"] == 284
    assert c["examples"]["train"] + c["examples"]["validation"] == 284
    assert info["tokenizer"]["fingerprint"] == tok.fingerprint
    lines = [normalize_text(line) for line in novel_path.read_text(encoding="utf-8").splitlines()]
    # <s> + pieces + </s> longer than 30: 38 lines (35 have more than 30 counting <s> alone, as the
    # notebook's figure does); each keeps its front, cut at the end
    assert c["truncated"] == sum(len(tok.encode(line)) + 2 > 30 for line in lines) == 38
    examples = read_split(out, info, "train") + read_split(out, info, "validation")
    assert all(ids[0] == tok.bos_id for ids, _ in examples)
    assert as_counter(examples) == expected_examples(tok, lines, 30)
    assert c["unk_tokens"] == sum(ids[:n].count(tok.unk_id) for ids, n in examples) > 0


# --- hostile inputs ---------------------------------------------------------------------


def test_compressed_inputs_are_shared_by_the_workers_without_needless_parts() -> None:
    assert [preprocess.compressed_parts(10 << 20, workers, 1) for workers in (1, 2, 3)] == [1, 2, 3]
    assert preprocess.compressed_parts(10 << 20, 2, 10) == 1  # ten files already keep two workers busy
    assert preprocess.compressed_parts(10 << 20, 4, 2) == 2
    assert [preprocess.compressed_parts(size << 20, 0, 1) for size in (10, 100, 10_000)] == [1, 2, 4]


def test_the_command_never_imports_tensorflow(tmp_path: Path, tiny_tokenizer) -> None:
    src = tmp_path / "a.txt.gz"
    src.write_bytes(gzip.compress(("\n".join(make_sentences(40)) + "\n").encode()))
    out = tmp_path / "out"
    code = (
        "import sys; from pipelines import preprocess; "
        f"assert preprocess.main({argv([src], tiny_tokenizer, out, '--packing')!r}) == 0; "
        "print('tensorflow' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("False")


def test_empty_train_split_is_an_error_unless_allowed(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    src = tmp_path / "utf16.txt"
    src.write_text("\n".join(make_sentences(20)) + "\n", encoding="utf-16")  # read as UTF-8: all rejected
    out = tmp_path / "out"
    assert preprocess.main(argv([src], tiny_tokenizer, out)) == 1
    err = capsys.readouterr().err
    assert "no train and validation examples" in err and "--allow-empty" in err and "rejected 20" in err
    assert not is_completed(str(out))
    pending = outputs.read_pending(str(out))
    assert pending is not None
    info = json.loads((out / pending.work / "info.json").read_text())  # the counts stay readable
    assert info["counts"]["rejected"] == 20 and info["counts"]["examples"] == {"train": 0, "validation": 0}
    allowed = tmp_path / "allowed"
    assert preprocess.main(argv([src], tiny_tokenizer, allowed, "--allow-empty")) == 0
    assert is_completed(str(allowed))
    # with --val-fraction 0 only train is needed
    one = tmp_path / "one.txt"
    one.write_text(make_sentences(1)[0] + "\n", encoding="utf-8")
    assert preprocess.main(argv([one], tiny_tokenizer, tmp_path / "one", "--val-fraction", "0")) == 0


def test_hostile_corpus_every_line_and_file_has_one_fate(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    good = make_sentences(200)
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_text("\n".join(good[:100]) + "\n", encoding="utf-8")
    whole = gzip.compress(("\n".join(good[100:200]) + "\n").encode())
    (src / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    (src / "cr.txt").write_bytes("\r".join(good[:30]).encode() + b"\r")  # old Mac line ends
    big = "가" * ((5 << 20) // 3)  # one 5 MB line, no line end
    (src / "big.txt").write_bytes(good[0].encode() + b"\n" + big.encode())
    special = ["<usr> 안녕 <sys>", "취소선 <s>가격</s> 할인 <pad>", "<unused0>"]
    (src / "special.txt").write_text("\n".join(special) + "\n", encoding="utf-8")
    (src / "utf16.txt").write_text("\n".join(good[:10]) + "\n", encoding="utf-16")
    out = tmp_path / "out"
    # a corrupt input fails the run (exit 1, nothing committed) unless it is accepted
    assert preprocess.main(argv([src / "*"], tiny_tokenizer, out, "--max-len", "64")) == 1
    err = capsys.readouterr().err
    assert "1 corrupt or truncated input file" in err and "cut.txt.gz" in err and "--allow-corrupt-input" in err
    assert not is_completed(out)
    assert preprocess.main(argv([src / "*"], tiny_tokenizer, out, "--max-len", "64", "--allow-corrupt-input")) == 0
    summary = capsys.readouterr().out
    assert "1 corrupt or truncated input file" in summary and "cut.txt.gz" in summary

    info = read_info(out)
    assert info["allow_corrupt_input"] is True
    check_folder(out, info)
    check_accounting(info)
    c = info["counts"]
    letters = [json.loads(x) for x in (current(out) / preprocess.REJECTED_FILE).read_text().splitlines()]
    by_file: dict[str, Counter] = {}
    for r in letters:
        by_file.setdefault(Path(r["file"]).name, Counter())[r["reason"]] += 1
    assert by_file["cut.txt.gz"] == Counter({"corrupt_input": 1})
    assert by_file["big.txt"] == Counter({"too_long": 1})
    assert by_file["utf16.txt"]["undecodable"] >= 1 and set(by_file["utf16.txt"]) == {"undecodable"}
    assert set(by_file) == {"cut.txt.gz", "big.txt", "utf16.txt"}
    (cut,) = [r for r in letters if r["reason"] == "corrupt_input"]
    assert cut["line"] is None and c["corrupt_inputs"] == [cut["file"]]
    (too_long,) = [r for r in letters if r["reason"] == "too_long"]
    assert too_long["line"] == 2 and unescape_bytes(too_long["raw"]) == big.encode()[: textio.PREFIX_BYTES]
    assert c["rejected"] == len(letters) - 1 == sum(c["rejected_by_reason"].values())
    assert c["rejected_by_reason"]["too_long"] == 1
    # lines in: good 100 + cut (whatever was whole before the cut) + \r-only 30 + big 2 + special 3 + utf16 lines
    utf16_lines = len((src / "utf16.txt").read_bytes().split(b"\n"))  # 10 and a last b"\x00" (empty)
    cut_lines = c["lines_read"] - (100 + 30 + 2 + 3 + utf16_lines)
    assert 0 < cut_lines < 100
    utf16_kept = utf16_lines - by_file["utf16.txt"]["undecodable"] - 1
    assert c["kept"] == 100 + cut_lines + 30 + 1 + 3 + utf16_kept
    assert c["filtered"]["empty"] == 1  # the UTF-16 file's last "line", b"\x00"
    examples = read_split(out, info, "train") + read_split(out, info, "validation")
    ids = [t for row, n in examples for t in row[1 : n - 1]]  # between <s> and </s>
    assert not set(ids) & tiny_tokenizer.special_ids  # typed specials never became special ids
    texts = {tiny_tokenizer.decode(row[:n]) for row, n in examples}
    assert set(special) <= texts and set(good[:30]) <= texts


# --- the output protocol as a scheduler meets it ------------------------------------------


def test_every_input_given_is_read_and_stray_arguments_are_refused(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    sentences = make_sentences(40)
    a.write_text("\n".join(sentences[:20]) + "\n", encoding="utf-8")
    b.write_text("\n".join(sentences[20:]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    tok = ["--tokenizer", str(tiny_tokenizer.path), "--output", str(out)]
    # several files after one flag (what an unquoted shell glob expands to): every one is read
    assert preprocess.main(["--input", str(a), str(b), *tok]) == 0
    assert read_info(out)["counts"]["lines_read"] == 40 and read_info(out)["inputs"] == [str(a), str(b)]
    for stray, message in (
        ([str(b)], "unexpected argument(s)"),  # a file after another flag's value: never dropped
        (["-x", "1"], "unknown option -x"),
    ):
        assert preprocess.main(["--input", str(a), *tok, "--max-len", "20", *stray]) == 2
        assert message in capsys.readouterr().err


def test_a_failed_or_empty_rebuild_keeps_the_current_version(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(make_sentences(30)) + "\n", encoding="utf-8")
    bad.write_text("\n".join(make_sentences(10)) + "\n", encoding="utf-16")  # every line undecodable
    out = tmp_path / "out"
    assert preprocess.main(argv([good], tiny_tokenizer, out)) == 0
    committed = folder_state(out)
    # an --overwrite rebuild from an export that came out empty: exit 1, the good version stays current
    assert preprocess.main(argv([bad], tiny_tokenizer, out, "--overwrite")) == 1
    assert "nothing was committed" in capsys.readouterr().err.lower()
    assert {k: v for k, v in folder_state(out).items() if k in committed} == committed
    assert read_info(out)["counts"]["kept"] == 30
    check_folder(out, read_info(out))
    # a truncated .gz (an interrupted upload): exit 1, the previous version stays current
    whole = gzip.compress(("\n".join(make_sentences(400)) + "\n").encode())
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    assert preprocess.main(argv([cut], tiny_tokenizer, out, "--overwrite")) == 1
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
    assert preprocess.main([*common, "--output", str(spans / "span-1")]) == 0
    (incoming / "day2.txt").write_text("\n".join(sentences[30:60]) + "\n", encoding="utf-8")
    assert preprocess.main([*common, *span, "--output", str(spans / "span-2")]) == 0
    assert read_info(spans / "span-2")["inputs"] == [str(incoming / "day2.txt")]
    # nothing new: exit 0, no folder written
    capsys.readouterr()
    assert preprocess.main([*common, *span, "--output", str(spans / "span-3")]) == 0
    assert "nothing new" in capsys.readouterr().out and not (spans / "span-3").exists()
    # a file already read that changed since: refused, never read twice or skipped silently
    with (incoming / "day1.txt").open("a", encoding="utf-8") as f:
        f.write(sentences[60] + "\n")
    assert preprocess.main([*common, *span, "--output", str(spans / "span-3")]) == 2
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
    assert preprocess.main(argv([src], tiny_tokenizer, out)) == 0
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["complete"] and s["current"]["job"] == "preprocess" and s["current"]["summary"]["lines_read"] == 30
    assert s["current"]["files"] == len(outputs.read_manifest(str(out))[0].files)  # type: ignore[index]
    assert main(["status", str(out), "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(current(out))


def test_run_config_says_how_the_run_ended(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    import dataclasses

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
