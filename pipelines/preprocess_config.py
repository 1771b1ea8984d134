"""The settings of one preprocessing run (its flags) and what planning resolves before it starts.

Both :mod:`pipelines.preprocess` (the job) and :mod:`pipelines.preprocess_steps` (its steps)
import this module; neither imports the other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kogpt2 import records
from kogpt2 import text as textlib
from kogpt2.flags import flag
from kogpt2.outputs import DEFAULT_KEEP_VERSIONS, DEFAULT_LEASE_SECONDS
from kogpt2.storage import local_path
from kogpt2.validate import check_bool, check_choice, check_int, check_number
from pipelines.shards.textio import MAX_LINE_BYTES, REJECTED_FILE

#: Auto sharding: one train shard per this many input bytes (at most MAX_AUTO_SHARDS).
AUTO_SHARD_BYTES = 128 << 20
MAX_AUTO_SHARDS = 1000


@dataclass(frozen=True)
class PreprocessConfig:
    """What defines a preprocessing run. Validated on creation; errors name the field.

    Attributes:
        inputs: file globs (any Beam filesystem).
        tokenizer: tokenizer file or model folder (a ``gs://`` file on Dataflow).
        output: output folder.
        max_len: tokens per example, ``<s>`` and ``</s>`` included (at least 3).
        val_fraction: share of texts in the validation split, in [0, 1).
        packing: concatenate sentences into full blocks instead of padding each.
        overflow: a sentence longer than ``max_len`` is cut at the end (``truncate``) or into
            ``window`` pieces. Ignored with ``packing``, where sentences run across blocks.
        encoding: text encoding of the inputs (``utf-8``, ``cp949``, ``euc-kr``, ...).
        split_sentences: lines are paragraphs: split them into sentences.
        min_chars: shortest normalized text kept, in characters.
        dedup: drop exact duplicates of normalized texts (sentences with ``split_sentences``).
        num_shards: train shards; 0 chooses one per 128 MiB of input.
        overwrite: build a new version even if the output folder holds another run (or this very
            run, complete); the current version stays readable until the new one commits.
        keep_versions: committed versions kept after a commit, the new one included.
        exclude_inputs_of: complete shard folders (globs) whose input files this run skips: a
            scheduled run preprocesses only the files that arrived since (one span per run).
        max_line_bytes: longest line read, in bytes (terminator excluded); longer lines are
            dead letters (``too_long``).
        allow_empty: commit even when a split training needs has no example.
        allow_corrupt_input: commit even when a compressed input is truncated or corrupt (its
            lines before the damage are used; ``info.json`` lists it).
        lease_seconds: the output folder's lock expires this long after its last renewal.
        batch_size: lines per element between steps (tuning).
        spill_mb: memory a worker sorts in before it spills a run to disk (tuning).
    """

    inputs: tuple[str, ...] = field(
        metadata=flag("input files (repeatable; gs:// works)", metavar="GLOB", name="--input", required=True)
    )
    tokenizer: str = field(metadata=flag("tokenizer file or model folder", metavar="PATH"))
    output: str = field(metadata=flag("output folder", metavar="DIR"))
    max_len: int = field(default=30, metadata=flag("tokens per example incl. <s> and </s>", metavar="N"))
    val_fraction: float = field(default=0.1, metadata=flag("validation share, in [0, 1)", metavar="F"))
    packing: bool = field(default=False, metadata=flag("pack sentences into full blocks instead of padding each"))
    overflow: str = field(
        default="truncate",
        metadata=flag("long sentences: truncate (keep the front) or window", choices=records.OVERFLOW_MODES),
    )
    encoding: str = field(
        default="utf-8", metadata=flag("input encoding: utf-8 (BOM handled), cp949, euc-kr, ...", metavar="NAME")
    )
    split_sentences: bool = field(default=False, metadata=flag("lines are paragraphs: split them into sentences"))
    min_chars: int = field(default=1, metadata=flag("drop texts shorter than this", metavar="N"))
    dedup: bool = field(default=False, metadata=flag("drop exact duplicates of normalized texts"))
    num_shards: int = field(default=0, metadata=flag("train shards; 0 = one per 128 MiB of input", metavar="N"))
    overwrite: bool = field(
        default=False,
        metadata=flag(
            "build a new version over another run (the current one stays readable until it commits)", per_run=True
        ),
    )
    keep_versions: int = field(
        default=DEFAULT_KEEP_VERSIONS,
        metadata=flag("committed versions kept after a commit, the new one included", metavar="N"),
    )
    exclude_inputs_of: tuple[str, ...] = field(
        default=(),
        metadata=flag(
            "skip the input files that these complete shard folders (globs) were built from: only new files are read",
            metavar="DIR_GLOB",
        ),
    )
    max_line_bytes: int = field(
        default=MAX_LINE_BYTES,
        metadata=flag("longest line in bytes; longer lines are rejected as too_long", metavar="N"),
    )
    allow_empty: bool = field(
        default=False,
        metadata=flag("mark the run COMPLETED even when train (or validation, with --val-fraction > 0) has no example"),
    )
    allow_corrupt_input: bool = field(
        default=False,
        metadata=flag("commit even when a compressed input is truncated or corrupt (it is listed in info.json)"),
    )
    lease_seconds: float = field(
        default=DEFAULT_LEASE_SECONDS, metadata=flag("the output lock's lease", metavar="S", hidden=True)
    )
    batch_size: int = field(default=4096, metadata=flag("lines per element between steps", hidden=True))
    spill_mb: float = field(default=32.0, metadata=flag("MiB a worker sorts before spilling a run", hidden=True))

    def __post_init__(self) -> None:
        inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        object.__setattr__(self, "inputs", inputs)
        if not inputs or not all(isinstance(g, str) and g for g in inputs):
            raise ValueError(f"inputs={inputs!r}: give at least one non-empty file glob")
        for name in ("tokenizer", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r}: required")
            object.__setattr__(self, name, local_path(getattr(self, name)))
        owner = "PreprocessConfig"
        check_int(owner, "max_len", self.max_len, low=3, note="<s> + one token + </s>")
        check_number(owner, "val_fraction", self.val_fraction, ge=0, lt=1)
        check_choice(owner, "overflow", self.overflow, records.OVERFLOW_MODES)
        object.__setattr__(self, "encoding", textlib.check_encoding(self.encoding))
        check_int(owner, "min_chars", self.min_chars, low=0, note="characters")
        check_int(owner, "num_shards", self.num_shards, low=0, note="0 = auto")
        check_int(owner, "max_line_bytes", self.max_line_bytes, low=1, note="bytes; default 1 MiB")
        check_int(owner, "batch_size", self.batch_size, low=1, note="lines")
        check_number(owner, "spill_mb", self.spill_mb, gt=0, note="MiB")
        check_int(owner, "keep_versions", self.keep_versions, low=1, note="the new version included")
        check_number(owner, "lease_seconds", self.lease_seconds, gt=0)
        object.__setattr__(self, "exclude_inputs_of", tuple(self.exclude_inputs_of))
        for name in ("packing", "split_sentences", "dedup", "overwrite", "allow_empty", "allow_corrupt_input"):
            check_bool(owner, name, getattr(self, name))


@dataclass(frozen=True)
class Plan:
    """What a run resolves before it starts: matched files, tokenizer facts, shard names."""

    files: tuple[str, ...]
    input_bytes: int
    tokenizer: dict[str, Any]
    shard_names: dict[str, tuple[str, ...]]
    run_id: str
    #: a local copy of the tokenizer file, and the name it gets beside the shards
    tokenizer_file: tuple[str, str] = ("", "")
    #: ``path -> [size, mtime]`` of the matched files: a changed corpus is a different run
    file_stats: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def all_names(self) -> list[str]:
        return [*self.shard_names["train"], *self.shard_names["validation"], REJECTED_FILE]


def shard_counts(config: PreprocessConfig, input_bytes: int) -> dict[str, int]:
    """Train shards (``num_shards`` or one per 128 MiB of input) and validation shards in proportion."""
    train = config.num_shards or max(1, min(MAX_AUTO_SHARDS, math.ceil(input_bytes / AUTO_SHARD_BYTES)))
    vf = float(config.val_fraction)
    val = 0 if vf == 0 else max(1, math.ceil(round(train * vf / (1 - vf), 6)))
    return {"train": train, "validation": val}
