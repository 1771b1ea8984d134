"""Per-row settings: rows with different settings share decode batches and come out as they would alone."""

from __future__ import annotations

import pytest

from kogpt2.generation import GenerationConfig, Generator, GenRow

PROMPTS = ["이때", "그날 밤", "마침내 그는", "아이들은 강가에서 오래 기다렸다", "노인은"]
BASE = GenerationConfig(max_new_tokens=14, seed=3)
#: Four-plus settings that differ in everything a row may choose.
SETTINGS = [
    BASE.replace(top_p=0.9),
    BASE.replace(temperature=0.7, top_k=20),
    BASE.replace(strategy="greedy", top_p=1.0, repetition_penalty=1.4),
    BASE.replace(top_p=1.0, temperature=1.6, no_repeat_ngram_size=2, min_new_tokens=6),
    BASE.replace(max_new_tokens=7, stop=("다",), seed=11),
    BASE.replace(top_p=0.5, temperature=1.2, repetition_penalty=1.2, max_new_tokens=20),
]


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from kogpt2.model import load_model

    model, tok = load_model(tiny_model_dir)
    return Generator(model, tok, batch_size=64)


def outputs(samples):
    return [(s.new_ids, s.text, s.finish_reason, s.row_seed, s.dropped_tokens) for s in samples]


def test_a_row_in_a_mixed_batch_equals_the_same_row_in_a_single_setting_job(generator):
    rows = [GenRow(p, i, cfg, key=(n, p, i)) for n, cfg in enumerate(SETTINGS) for p in PROMPTS for i in range(2)]
    outcomes = list(generator.stream_rows(rows[::-1], BASE))  # any order
    assert len(outcomes) == 3  # one batch per prompt-length bucket (4, 8 and 16 tokens), whatever the mix
    for o in outcomes:
        assert {r.key[0] for r in o.rows} == set(range(len(SETTINGS)))
        assert [s.key for s in o.samples] == [r.key for r in o.rows]
    by_key = {s.key: s for o in outcomes for s in o.samples}
    assert set(by_key) == {r.key for r in rows}
    for n, cfg in enumerate(SETTINGS):
        single = generator.generate([*PROMPTS], cfg.replace(num_samples=2))
        mixed = [by_key[(n, s.prompt, s.sample_index)] for s in single]
        assert outputs(mixed) == outputs(single), cfg.summary()
        assert [m.logprob_sum for m in mixed] == pytest.approx([s.logprob_sum for s in single], abs=1e-3)
    # the settings took effect: budgets, stops, greedy
    assert {by_key[(4, p, 0)].finish_reason for p in PROMPTS} <= {"stop", "eos", "length"}
    assert all(by_key[(4, p, i)].new_tokens <= 7 for p in PROMPTS for i in range(2))
    assert any(by_key[(5, p, 0)].new_tokens > 14 for p in PROMPTS)
    assert all(by_key[(2, p, 0)].new_ids == by_key[(2, p, 1)].new_ids for p in PROMPTS)
    assert all(by_key[(3, p, 0)].new_tokens >= 6 for p in PROMPTS)


def test_rows_without_a_config_use_the_calls_and_tuples_still_work(generator):
    tuples = generator.generate_rows([("이때", 0), ("그날 밤", 1)], BASE)
    rows = generator.generate_rows([GenRow("이때", 0), GenRow("그날 밤", 1, key="b")], BASE)
    assert outputs(rows) == outputs(tuples)
    assert [s.key for s in tuples] == [None, None] and [s.key for s in rows] == [None, "b"]
    with pytest.raises(ValueError, match="sample_index=-1"):
        generator.generate_rows([GenRow("이때", -1)], BASE)
    with pytest.raises(ValueError, match="max_new_tokens=300"):
        generator.generate_rows([GenRow("이때", 0, BASE.replace(max_new_tokens=300))], BASE)


def test_only_suppressed_tokens_and_valid_utf8_split_batches(generator):
    from kogpt2.generation import batch_key

    shared = [BASE, BASE.replace(temperature=0.5, top_k=3, seed=9, stop=("x",), max_new_tokens=4)]
    apart = [BASE.replace(suppress_tokens=(0,)), BASE.replace(valid_utf8=False)]
    assert len({batch_key(c) for c in shared}) == 1 and len({batch_key(c) for c in [BASE, *apart]}) == 3
    rows = [GenRow(p, 0, cfg) for p in PROMPTS[1:3] for cfg in shared + apart]  # two prompts of one length bucket
    outcomes = list(generator.stream_rows(rows, BASE))
    assert sorted(len(o.rows) for o in outcomes) == [2, 2, 4]
