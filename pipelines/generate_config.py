"""The settings of one bulk-generation job: what its flags hold, and what planning resolved.

Both :mod:`pipelines.generate` (the job) and :mod:`pipelines.generate_units` (its steps)
import this module; neither imports the other.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from kogpt2.decoder import DTYPES
from kogpt2.flags import flag
from kogpt2.generation import DEFAULT_BATCH_SIZE, GenerationConfig
from kogpt2.outputs import DEFAULT_KEEP_VERSIONS, DEFAULT_LEASE_SECONDS
from kogpt2.storage import local_path
from kogpt2.validate import check_bool, check_choice, check_int, check_number
from pipelines.seeds import FORMATS

#: Default target of rows per output file (and per work unit: the resume granularity).
DEFAULT_ROWS_PER_FILE = 5000


@dataclass(frozen=True)
class GenerateJob:
    """Our flags, validated (Beam's options are kept apart). Each field's flag is in its metadata."""

    model: str = field(metadata=flag("model folder (local or gs://)", metavar="DIR"))
    seeds: tuple[str, ...] = field(
        metadata=flag("seed files: .txt, .csv, .jsonl, .parquet", metavar="GLOB", required=True)
    )
    output: str = field(metadata=flag("output folder (local or gs://)", metavar="DIR"))
    config: GenerationConfig = field(default_factory=GenerationConfig)  # the strategy flags build it
    seed_column: str = field(default="seed", metadata=flag("column / key of .csv, .jsonl, .parquet seeds"))
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata=flag("rows decoded together", metavar="N"))
    dtype: str = field(default="float32", metadata=flag("computation type", choices=DTYPES))
    rows_per_file: int = field(
        default=DEFAULT_ROWS_PER_FILE, metadata=flag("target rows per Parquet file, one work unit each", metavar="N")
    )
    num_shards: int = field(
        default=0, metadata=flag("exact number of files instead (0 = from --rows-per-file)", metavar="N")
    )
    max_seed_tokens: int = field(default=0, metadata=flag("reject longer seeds (0 = the model's limit)", metavar="N"))
    progress_seconds: float = field(default=30.0, metadata=flag("log progress every S seconds", metavar="S"))
    share_model_across_processes: bool = field(
        default=False, metadata=flag("one model per machine shared by all worker processes (GPU workers)")
    )
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
    lease_seconds: float = field(
        default=DEFAULT_LEASE_SECONDS, metadata=flag("the output lock's lease", metavar="S", hidden=True)
    )
    verbose: bool = field(default=False, metadata=flag("show TensorFlow, Beam and transformers messages"))

    def __post_init__(self) -> None:
        owner = "GenerateJob"
        check_int(owner, "batch_size", self.batch_size, low=1)
        check_choice(owner, "dtype", self.dtype, DTYPES)
        check_int(owner, "rows_per_file", self.rows_per_file, low=1)
        check_int(owner, "num_shards", self.num_shards, low=0, note="0 = from --rows-per-file")
        check_int(owner, "max_seed_tokens", self.max_seed_tokens, low=0, note="0 = the model's limit")
        check_number(owner, "progress_seconds", self.progress_seconds, gt=0)
        check_int(owner, "keep_versions", self.keep_versions, low=1, note="the new version included")
        check_number(owner, "lease_seconds", self.lease_seconds, gt=0)
        object.__setattr__(self, "output", local_path(self.output))
        object.__setattr__(self, "model", local_path(self.model))
        for name in ("share_model_across_processes", "overwrite", "verbose"):
            check_bool(owner, name, getattr(self, name))
        for path in self.seeds:
            if os.path.splitext(path)[1].lower() not in FORMATS:
                raise ValueError(f"--seeds file {path}: unknown format; use one of {sorted(FORMATS)}")

    def settings(self) -> dict[str, Any]:
        """Every setting as a flat JSON object: what ``--config FILE`` reads back to repeat the run."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "config" and not f.metadata.get("per_run")
        }
        out["seeds"] = list(self.seeds)
        return {**out, **self.config.describe()}


@dataclass(frozen=True)
class GeneratePlan:
    """What the job resolved from its inputs before anything runs.

    Attributes:
        n_positions: the model's context size.
        max_seed_tokens: the longest seed accepted (``<s>`` included).
        model_fingerprint: sha256 of the weights file (hashed once).
        tokenizer_fingerprint: sha256 of the tokenizer file.
        seed_files: ``path -> [bytes, mtime]`` of every seed file (a changed file is a different run).
        started: launch time (seconds since the epoch), for ``wall_seconds``.
    """

    n_positions: int
    max_seed_tokens: int
    model_fingerprint: str
    tokenizer_fingerprint: str
    seed_files: dict[str, list[int]] = field(default_factory=dict)
    started: float = 0.0
