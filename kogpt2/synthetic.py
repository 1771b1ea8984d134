"""Deterministic Korean sentences for tests, benchmarks and smoke runs (one generator for all).

``korean_sentences(n, start)`` gives sentences ``start .. start + n - 1`` of one endless,
distinct sequence: subject, place and act cycle at different rates and the sentence's index
makes every one unique. Real text for measurements is the shared review corpus; this is for
runs that need a corpus of a chosen size and nothing else.
"""

from __future__ import annotations

SUBJECTS = (
    "그는",
    "그녀는",
    "아이들은",
    "어머니는",
    "노인은",
    "우리는",
    "사람들은",
    "이때 그는",
    "그날 밤",
    "마침내 그는",
)
PLACES = ("시장에서", "강가에서", "학교 앞에서", "비 오는 거리에서", "기차역에서", "작은 방에서", "산길에서")
ACTS = (
    "오래 기다렸다",
    "조용히 웃었다",
    "편지를 읽었다",
    "밥을 지었다",
    "길을 잃었다",
    "노래를 불렀다",
    "하늘을 보았다",
)


def korean_sentence(i: int) -> str:
    """Sentence ``i`` of the sequence (``i >= 0``)."""
    s = SUBJECTS[i % len(SUBJECTS)]
    p = PLACES[(i // len(SUBJECTS)) % len(PLACES)]
    a = ACTS[(i // (len(SUBJECTS) * len(PLACES))) % len(ACTS)]
    return f"{s} {p} {a} {i}번째 날이었다."


def korean_sentences(n: int, start: int = 0) -> list[str]:
    """``n`` distinct sentences, ``start`` .. ``start + n - 1`` of the sequence."""
    return [korean_sentence(i) for i in range(start, start + n)]
