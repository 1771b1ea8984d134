"""Preprocessing's counts and info.json: count names declared once, summed, and the settings info.json records."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_sentences

from pipelines import preprocess, preprocess_info
from pipelines.counters import Count, Counters, StepCounts
from pipelines.preprocess_config import PreprocessConfig, Role, role_of, settings
from pipelines.shards.writer import WrittenFile


def tally(**counts: int) -> preprocess_info.RunTally:
    return preprocess_info.RunTally(Counter({Count[k.upper()]: n for k, n in counts.items()}), (), ())


def test_summarize_counts_refuses_broken_accounting() -> None:
    config = PreprocessConfig(inputs=("a",), tokenizer="t", output="o")
    counts = preprocess_info.summarize_counts(config, tally(lines_read=5, kept=3, filtered_empty=1, rejected=1))
    assert counts["filtered"] == {"empty": 1, "too_short": 0, "duplicate": 0}
    with pytest.raises(RuntimeError, match="accounting"):
        preprocess_info.summarize_counts(config, tally(lines_read=6, kept=3))


def test_count_names_are_declared_once_and_a_misspelt_one_fails() -> None:
    assert all(c.value == c.name.lower() for c in Count)  # the Beam counter's name is the member's
    with pytest.raises(AttributeError):
        Count.LINES_RAED  # noqa: B018
    with pytest.raises(TypeError, match="not Count members"):
        StepCounts({"lines_read": 1})  # type: ignore[dict-item]
    counters = Counters()
    step = counters.report({Count.LINES_READ: 3, Count.KEPT: 0}, ("a.gz",))
    assert step == StepCounts({Count.LINES_READ: 3, Count.KEPT: 0}, ("a.gz",))


def test_collect_run_sums_counts_and_lists_files_in_any_order() -> None:
    collect = preprocess_info.CollectRun()
    items = [
        StepCounts({Count.LINES_READ: 2, Count.KEPT: 2}),
        WrittenFile("validation-00000-of-00001.tfrecord.gz", "validation", 1, "b" * 64),
        StepCounts({Count.LINES_READ: 3, Count.CORRUPT_INPUTS: 1}, ("z.gz",)),
        WrittenFile("train-00000-of-00001.tfrecord.gz", "train", 4, "a" * 64),
        StepCounts({Count.CORRUPT_INPUTS: 1}, ("a.gz",)),
    ]
    halves = []
    for part in (items[:2], items[2:]):
        acc = collect.create_accumulator()
        for item in part:
            acc = collect.add_input(acc, item)
        halves.append(acc)
    out = collect.extract_output(collect.merge_accumulators(halves[::-1]))
    assert out.counts == Counter({Count.LINES_READ: 5, Count.KEPT: 2, Count.CORRUPT_INPUTS: 2})
    assert out.corrupt_inputs == ("a.gz", "z.gz")
    assert [f.name for f in out.files] == ["train-00000-of-00001.tfrecord.gz", "validation-00000-of-00001.tfrecord.gz"]


def test_every_setting_declares_its_role() -> None:
    roles = {f.name: role_of(f) for f in dataclasses.fields(PreprocessConfig)}
    assert {name for name, role in roles.items() if role is Role.INPUT} == {"inputs", "tokenizer"}
    assert roles["max_len"] is Role.SHAPES and roles["overwrite"] is Role.RUN and roles["batch_size"] is Role.RUN


def test_signature_and_info_record_the_same_output_shaping_settings(tmp_path: Path, tiny_tokenizer) -> None:
    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_sentences(5)) + "\n", encoding="utf-8")
    config = PreprocessConfig(
        inputs=(str(src),), tokenizer=str(tiny_tokenizer.path), output=str(tmp_path / "out"), max_len=12, num_shards=2
    )
    plan = preprocess.make_plan(config)
    flags = preprocess.signature(config, plan)["flags"]
    shaping = settings(config, Role.SHAPES)
    # what a run's signature held before the roles were declared (existing folders stay "already complete")
    assert list(flags) == ["inputs", "tokenizer", *shaping]
    assert list(shaping) == [
        "max_len", "val_fraction", "packing", "overflow", "encoding", "split_sentences", "min_chars", "dedup",
        "num_shards", "max_line_bytes",
    ]  # fmt: skip
    info = preprocess_info.build_info(config, plan, tally())
    assert {k: info[k] for k in shaping} == shaping == {k: flags[k] for k in shaping}
    assert info["inputs"] == [str(src)] and info["tokenizer"] == tiny_tokenizer.describe()
    assert flags["inputs"] == [str(src)] and flags["tokenizer"] == str(tiny_tokenizer.path)
