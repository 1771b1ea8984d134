"""Generation statistics: pure functions over generated texts.

Words are whitespace-separated eojeol (Korean spacing units), so the figures do not
depend on a tokenizer and compare across models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

UNK_SURFACE = "\u2047"  # what SentencePiece decodes <unk> to (⁇)


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All n-grams of a word list, in order."""
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams, pooled over texts (0.0 when there are none)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0.0 when none)."""
    total = repeated = 0
    for t in texts:
        seen: set[tuple[str, ...]] = set()
        for g in ngrams(t.split(), n):
            total += 1
            if g in seen:
                repeated += 1
            seen.add(g)
    return repeated / total if total else 0.0


@dataclass(frozen=True)
class GenerationStats:
    """Summary figures of one set of generations."""

    samples: int
    distinct_1: float
    distinct_2: float
    repetition_rate: float
    mean_new_tokens: float
    mean_words: float
    eos_share: float
    unk_rate: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def generation_stats(
    continuations: Sequence[str], new_tokens: Sequence[int], finish_reasons: Sequence[str]
) -> GenerationStats:
    """Figures over the generated parts of a set of samples.

    Args:
        continuations: the generated text of each sample (prompt excluded).
        new_tokens: generated token counts.
        finish_reasons: ``eos`` or ``length`` per sample.

    Returns:
        distinct-1/2, trigram repetition rate, mean length (tokens and words), the share
        that ended with ``</s>``, and the ``<unk>`` rate (``⁇`` per generated token).
    """
    if not (len(continuations) == len(new_tokens) == len(finish_reasons)):
        raise ValueError("continuations, new_tokens and finish_reasons must have the same length")
    n = len(continuations)
    tokens = sum(int(t) for t in new_tokens)
    return GenerationStats(
        samples=n,
        distinct_1=distinct_n(continuations, 1),
        distinct_2=distinct_n(continuations, 2),
        repetition_rate=repetition_rate(continuations),
        mean_new_tokens=tokens / n if n else 0.0,
        mean_words=sum(len(c.split()) for c in continuations) / n if n else 0.0,
        eos_share=sum(r == "eos" for r in finish_reasons) / n if n else 0.0,
        unk_rate=sum(c.count(UNK_SURFACE) for c in continuations) / tokens if tokens else 0.0,
    )
