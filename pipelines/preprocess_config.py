"""The settings of one preprocessing run (its flags) and what planning resolves before it starts.

Each setting is a field of :class:`PreprocessConfig` that declares, once, its flag and its
:class:`Role`: whether it names an input, shapes the output (then the run's signature and
``info.json`` both record it, through :func:`settings`), or only says how this run writes, keeps
or accepts its output. Both :mod:`pipelines.preprocess` (the job) and
:mod:`pipelines.preprocess_steps` (its steps) import this module; neither imports the other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kogpt2 import records
from kogpt2 import text as textlib
from kogpt2.flags import flag
from kogpt2.outputs import DEFAULT_KEEP_VERSIONS, DEFAULT_LEASE_SECONDS
from kogpt2.records import TokenizerFacts
from kogpt2.storage import local_path
from kogpt2.validate import check_bool, check_choice, check_int, check_number
from pipelines.shards.textio import MAX_LINE_BYTES, REJECTED_FILE

#: Auto sharding: one train shard per this many input bytes (at most MAX_AUTO_SHARDS).
AUTO_SHARD_BYTES = 128 << 20
MAX_AUTO_SHARDS = 1000


class Role(Enum):
    """What a setting is to a run: how its signature and its ``info.json`` record it."""

    #: names what the run reads (globs, the tokenizer): the signature records it as given; the plan
    #: resolves it, and info.json records what it resolved to (the files, the tokenizer's facts)
    INPUT = "input"
    #: shapes the examples: the signature and info.json record it
    SHAPES = "shapes"
    #: where and how this run writes, keeps or accepts its output: outside the signature
    RUN = "run"


_ROLE = "role"


def setting(role: Role, help: str, **flag_options: Any) -> dict[str, Any]:
    """Field metadata: the field's flag (:func:`kogpt2.flags.flag`) and its :class:`Role`."""
    return {**flag(help, **flag_options), _ROLE: role}


def role_of(f: dataclasses.Field[Any]) -> Role:
    """A config field's :class:`Role`.

    Raises:
        TypeError: the field declares none (every field must).
    """
    role = f.metadata.get(_ROLE)
    if not isinstance(role, Role):
        raise TypeError(f"PreprocessConfig.{f.name} declares no Role: give it metadata=setting(Role...., ...)")
    return role


def settings(config: PreprocessConfig, *roles: Role) -> dict[str, Any]:
    """The settings of the given roles, by field name in field order, as JSON values (tuples as lists)."""
    return {
        f.name: list(value) if isinstance(value := getattr(config, f.name), tuple) else value
        for f in dataclasses.fields(config)
        if role_of(f) in roles
    }


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
        metadata=setting(
            Role.INPUT, "input files (repeatable; gs:// works)", metavar="GLOB", name="--input", required=True
        )
    )
    tokenizer: str = field(metadata=setting(Role.INPUT, "tokenizer file or model folder", metavar="PATH"))
    output: str = field(metadata=setting(Role.RUN, "output folder", metavar="DIR"))
    max_len: int = field(
        default=30, metadata=setting(Role.SHAPES, "tokens per example incl. <s> and </s>", metavar="N")
    )
    val_fraction: float = field(default=0.1, metadata=setting(Role.SHAPES, "validation share, in [0, 1)", metavar="F"))
    packing: bool = field(
        default=False, metadata=setting(Role.SHAPES, "pack sentences into full blocks instead of padding each")
    )
    overflow: str = field(
        default="truncate",
        metadata=setting(
            Role.SHAPES, "long sentences: truncate (keep the front) or window", choices=records.OVERFLOW_MODES
        ),
    )
    encoding: str = field(
        default="utf-8",
        metadata=setting(Role.SHAPES, "input encoding: utf-8 (BOM handled), cp949, euc-kr, ...", metavar="NAME"),
    )
    split_sentences: bool = field(
        default=False, metadata=setting(Role.SHAPES, "lines are paragraphs: split them into sentences")
    )
    min_chars: int = field(default=1, metadata=setting(Role.SHAPES, "drop texts shorter than this", metavar="N"))
    dedup: bool = field(default=False, metadata=setting(Role.SHAPES, "drop exact duplicates of normalized texts"))
    num_shards: int = field(
        default=0, metadata=setting(Role.SHAPES, "train shards; 0 = one per 128 MiB of input", metavar="N")
    )
    overwrite: bool = field(
        default=False,
        metadata=setting(
            Role.RUN,
            "build a new version over another run (the current one stays readable until it commits)",
            per_run=True,
        ),
    )
    keep_versions: int = field(
        default=DEFAULT_KEEP_VERSIONS,
        metadata=setting(Role.RUN, "committed versions kept after a commit, the new one included", metavar="N"),
    )
    exclude_inputs_of: tuple[str, ...] = field(
        default=(),
        metadata=setting(
            Role.RUN,
            "skip the input files that these complete shard folders (globs) were built from: only new files are read",
            metavar="DIR_GLOB",
        ),
    )
    max_line_bytes: int = field(
        default=MAX_LINE_BYTES,
        metadata=setting(Role.SHAPES, "longest line in bytes; longer lines are rejected as too_long", metavar="N"),
    )
    allow_empty: bool = field(
        default=False,
        metadata=setting(
            Role.RUN, "mark the run COMPLETED even when train (or validation, with --val-fraction > 0) has no example"
        ),
    )
    allow_corrupt_input: bool = field(
        default=False,
        metadata=setting(
            Role.RUN, "commit even when a compressed input is truncated or corrupt (it is listed in info.json)"
        ),
    )
    lease_seconds: float = field(
        default=DEFAULT_LEASE_SECONDS, metadata=setting(Role.RUN, "the output lock's lease", metavar="S", hidden=True)
    )
    batch_size: int = field(default=4096, metadata=setting(Role.RUN, "lines per element between steps", hidden=True))
    spill_mb: float = field(
        default=32.0, metadata=setting(Role.RUN, "MiB a worker sorts before spilling a run", hidden=True)
    )

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
        object.__setattr__(self, "val_fraction", float(self.val_fraction))
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
    """What a run resolves before it starts: the matched files, the tokenizer, the shard names.

    Attributes:
        files: the matched input files, sorted.
        file_stats: ``path -> [size, mtime]`` of each: a corpus edited in place is a different run.
        tokenizer: the facts of the tokenizer, loaded once (its ids frame and pad the examples).
        tokenizer_file: a local copy of the tokenizer file (copied beside the shards).
        tokenizer_name: the name that copy gets beside the shards (``tokenizer.spiece``, ``tokenizer.json``).
        shard_names: the shard files of each split.
        run_id: names this run's spill files.
    """

    files: tuple[str, ...]
    file_stats: Mapping[str, list[int]]
    tokenizer: TokenizerFacts
    tokenizer_file: str
    tokenizer_name: str
    shard_names: Mapping[str, tuple[str, ...]]
    run_id: str

    @property
    def input_bytes(self) -> int:
        """Bytes of the input files (compressed ones as stored)."""
        return sum(stat[0] for stat in self.file_stats.values())

    @property
    def all_names(self) -> list[str]:
        """Every file the pipeline writes: the shards of both splits, then the rejected lines."""
        return [*self.shard_names["train"], *self.shard_names["validation"], REJECTED_FILE]


def shard_counts(config: PreprocessConfig, input_bytes: int) -> dict[str, int]:
    """Train shards (``num_shards`` or one per 128 MiB of input) and validation shards in proportion."""
    train = config.num_shards or max(1, min(MAX_AUTO_SHARDS, math.ceil(input_bytes / AUTO_SHARD_BYTES)))
    vf = float(config.val_fraction)
    val = 0 if vf == 0 else max(1, math.ceil(round(train * vf / (1 - vf), 6)))
    return {"train": train, "validation": val}
