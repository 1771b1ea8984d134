from __future__ import annotations

import pytest

from kogpt2.genstats import distinct_n, generation_stats, ngrams, repetition_rate


def test_ngrams_and_distinct() -> None:
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert distinct_n(["비가 온다 비가 온다"], 1) == 0.5
    assert distinct_n(["비가 온다 비가 온다"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0


def test_repetition_rate_counts_repeated_trigrams_within_a_text() -> None:
    assert repetition_rate(["가 나 다 가 나 다"]) == pytest.approx(1 / 4)
    assert repetition_rate(["가 나 다", "가 나 다"]) == 0.0  # across texts is not repetition


def test_generation_stats() -> None:
    stats = generation_stats(["그는 웃었다", "⁇ 비가 왔다 비가"], [3, 5], ["eos", "length"])
    assert stats.samples == 2
    assert stats.mean_new_tokens == 4.0
    assert stats.eos_share == 0.5
    assert stats.unk_rate == pytest.approx(1 / 8)
    assert stats.mean_words == 3.0
    with pytest.raises(ValueError):
        generation_stats(["a"], [1, 2], ["eos"])
