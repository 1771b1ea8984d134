"""What the preprocessing pipeline makes of a corpus: real Beam runs on small files, read back with tf.data."""

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
from preprocess_helpers import (
    argv,
    as_counter,
    built,
    check_accounting,
    check_folder,
    current,
    expected_examples,
    is_completed,
    read_info,
    read_split,
    run_steps,
    shard_bytes,
    unescape_bytes,
)

from kogpt2 import records
from kogpt2.text import escape_bytes, normalize_text, split_sentences
from pipelines import preprocess
from pipelines.counters import NAMESPACE
from pipelines.preprocess import PreprocessConfig
from pipelines.shards import textio


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
    assert preprocess.run(argv([src], tiny_tokenizer, out, "--encoding", "cp949", "--max-len", "64")) == 0
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


def test_packing_fills_blocks_deterministically(tmp_path: Path, tiny_tokenizer) -> None:
    sentences = make_sentences(80)
    src = tmp_path / "a.txt"
    src.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out, again = tmp_path / "out", tmp_path / "again"
    flags = ("--packing", "--max-len", "16", "--num-shards", "2", "--val-fraction", "0.25")
    assert preprocess.run(argv([src], tiny_tokenizer, out, *flags)) == 0
    assert preprocess.run(argv([src], tiny_tokenizer, again, *flags)) == 0
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
    info = run_steps(test_pipeline, src, tiny_tokenizer, out, max_len=8, overflow="window", val_fraction=0.0)
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
    info = run_steps(test_pipeline, src, tiny_tokenizer, out, split_sentences=True, min_chars=3, dedup=True, max_len=40)
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
    assert preprocess.run(argv([novel_path], v1_tokenizer_path, out)) == 0
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


def test_the_command_never_imports_tensorflow(tmp_path: Path, tiny_tokenizer) -> None:
    src = tmp_path / "a.txt.gz"
    src.write_bytes(gzip.compress(("\n".join(make_sentences(40)) + "\n").encode()))
    out = tmp_path / "out"
    code = (
        "import sys; from pipelines import preprocess; "
        f"assert preprocess.run({argv([src], tiny_tokenizer, out, '--packing')!r}) == 0; "
        "print('tensorflow' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("False")


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
    assert preprocess.run(argv([src / "*"], tiny_tokenizer, out, "--max-len", "64")) == 1
    err = capsys.readouterr().err
    assert "1 corrupt or truncated input file" in err and "cut.txt.gz" in err and "--allow-corrupt-input" in err
    assert not is_completed(out)
    assert preprocess.run(argv([src / "*"], tiny_tokenizer, out, "--max-len", "64", "--allow-corrupt-input")) == 0
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
