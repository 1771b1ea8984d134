"""Preprocessing's settings and command line: flags built from the config, refused before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, make_sentences
from preprocess_helpers import (
    argv,
    read_info,
)

from pipelines import preprocess
from pipelines.preprocess import PreprocessConfig, parse_args


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
    assert preprocess.run(argv([src], tiny_tokenizer, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_tokenizer_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    src = tmp_path / "a.txt"
    src.write_text("그는 웃었다.\n", encoding="utf-8")
    bad = tmp_path / "bad.spiece"
    bad.write_bytes(b"not a sentencepiece model")
    out = tmp_path / "out"
    assert preprocess.run(argv([src], bad, out)) == 2
    assert "bad.spiece" in capsys.readouterr().err
    assert not out.exists()


def test_empty_glob_fails_the_command(tmp_path: Path, tiny_tokenizer) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.preprocess", *argv([tmp_path / "nothing-*.txt"], tiny_tokenizer, out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "nothing-*.txt" in proc.stderr and "matches no file" in proc.stderr
    assert not out.exists()


def test_every_input_given_is_read_and_stray_arguments_are_refused(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    sentences = make_sentences(40)
    a.write_text("\n".join(sentences[:20]) + "\n", encoding="utf-8")
    b.write_text("\n".join(sentences[20:]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    tok = ["--tokenizer", str(tiny_tokenizer.path), "--output", str(out)]
    # several files after one flag (what an unquoted shell glob expands to): every one is read
    assert preprocess.run(["--input", str(a), str(b), *tok]) == 0
    assert read_info(out)["counts"]["lines_read"] == 40 and read_info(out)["inputs"] == [str(a), str(b)]
    for stray, message in (
        ([str(b)], "unexpected argument(s)"),  # a file after another flag's value: never dropped
        (["-x", "1"], "unknown option -x"),
    ):
        assert preprocess.run(["--input", str(a), *tok, "--max-len", "20", *stray]) == 2
        assert message in capsys.readouterr().err


def test_compressed_inputs_are_shared_by_the_workers_without_needless_parts() -> None:
    assert [preprocess.compressed_parts(10 << 20, workers, 1) for workers in (1, 2, 3)] == [1, 2, 3]
    assert preprocess.compressed_parts(10 << 20, 2, 10) == 1  # ten files already keep two workers busy
    assert preprocess.compressed_parts(10 << 20, 4, 2) == 2
    assert [preprocess.compressed_parts(size << 20, 0, 1) for size in (10, 100, 10_000)] == [1, 2, 4]
