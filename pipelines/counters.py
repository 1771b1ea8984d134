"""The counts of a preprocessing run, declared once: the steps report them, Beam counts them, ``info.json`` sums them.

Every count is a member of :class:`Count`. A step reports what it counted for an element as
:class:`StepCounts` (by :class:`Count`, never by a string, so a misspelt name fails where it is
written), adds the same figures to its Beam counters (:class:`Counters`: namespace
:data:`NAMESPACE`, counter name = the member's value) and hands them on to be summed into
``info.json`` (:mod:`pipelines.preprocess_info`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from apache_beam.metrics import Metrics

#: The Beam Metrics namespace of every preprocessing counter.
NAMESPACE = "kogpt2.preprocess"


class Count(Enum):
    """A count of the preprocessing run; its value is its Beam counter's name."""

    #: input lines read (every line has one fate: kept, filtered or rejected)
    LINES_READ = "lines_read"
    #: lines with a text kept (with ``--dedup``: known only at the end, see DEDUP_*)
    KEPT = "kept"
    #: lines rejected as dead letters, all reasons
    REJECTED = "rejected"
    REJECTED_UNDECODABLE = "rejected_undecodable"
    REJECTED_TOO_LONG = "rejected_too_long"
    #: compressed input files found truncated or corrupt
    CORRUPT_INPUTS = "corrupt_inputs"
    FILTERED_EMPTY = "filtered_empty"
    FILTERED_TOO_SHORT = "filtered_too_short"
    #: lines whose every text was a duplicate (``--dedup``; counted at the end)
    FILTERED_DUPLICATE = "filtered_duplicate"
    #: with ``--dedup``: lines holding a text before deduplication, and after it (sentence splitting)
    DEDUP_CANDIDATE_LINES = "dedup_candidate_lines"
    DEDUP_KEPT_LINES = "dedup_kept_lines"
    #: texts (sentences with ``--split-sentences``) passed on, before deduplication
    SENTENCES_CANDIDATES = "sentences_candidates"
    #: sentences a split produced, and those too short
    SENTENCES_SPLIT = "sentences_split"
    SENTENCES_TOO_SHORT = "sentences_too_short"
    #: distinct texts after deduplication
    SENTENCES_UNIQUE = "sentences_unique"
    #: sequences longer than ``max_len``: cut at the end, or into windows
    TRUNCATED = "truncated"
    WINDOWED = "windowed"
    TOKENS_TRAIN = "tokens_train"
    TOKENS_VALIDATION = "tokens_validation"
    UNK_TRAIN = "unk_train"
    UNK_VALIDATION = "unk_validation"
    SEQUENCES_TRAIN = "sequences_train"
    SEQUENCES_VALIDATION = "sequences_validation"


#: Per split (:data:`kogpt2.records.SPLITS`): tokens, ``<unk>`` tokens and sequences.
TOKENS = {"train": Count.TOKENS_TRAIN, "validation": Count.TOKENS_VALIDATION}
UNKS = {"train": Count.UNK_TRAIN, "validation": Count.UNK_VALIDATION}
SEQUENCES = {"train": Count.SEQUENCES_TRAIN, "validation": Count.SEQUENCES_VALIDATION}
#: Rejected lines by dead-letter reason (a corrupt file is not a line: :data:`Count.CORRUPT_INPUTS`).
REJECTED_BY_REASON = {"undecodable": Count.REJECTED_UNDECODABLE, "too_long": Count.REJECTED_TOO_LONG}


@dataclass(frozen=True)
class StepCounts:
    """What a step counted for one element.

    Attributes:
        counts: figures by :class:`Count` (absent: 0).
        corrupt_inputs: the corrupt input files met (a file is named, not counted, by the step that read it).
    """

    counts: Mapping[Count, int]
    corrupt_inputs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        bad = [k for k in self.counts if not isinstance(k, Count)]
        if bad:
            raise TypeError(f"StepCounts: {bad!r} are not Count members")


class Counters:
    """A DoFn's Beam Metrics counters, one per :class:`Count`, created as they are first used."""

    def __init__(self) -> None:
        self._counters: dict[Count, Any] = {}

    def add(self, counts: Mapping[Count, int]) -> None:
        """Add the non-zero ``counts`` to their counters."""
        for count, value in counts.items():
            if value:
                if count not in self._counters:
                    self._counters[count] = Metrics.counter(NAMESPACE, count.value)
                self._counters[count].inc(value)

    def report(self, counts: Mapping[Count, int], corrupt_inputs: tuple[str, ...] = ()) -> StepCounts:
        """Add ``counts`` to the counters and return them as the :class:`StepCounts` the step hands on."""
        step = StepCounts(dict(counts), corrupt_inputs)
        self.add(step.counts)
        return step
