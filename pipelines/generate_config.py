"""The settings of one bulk-generation job: what its flags hold, and what planning resolved.

Both :mod:`pipelines.generate` (the job) and :mod:`pipelines.generate_units` (its steps)
import this module; neither imports the other.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from kogpt2.flags import flag
from kogpt2.generation_config import DEFAULT_BATCH_SIZE, DTYPES, DecodeSettings, GenerationConfig
from kogpt2.outputs import DEFAULT_KEEP_VERSIONS, DEFAULT_LEASE_SECONDS
from kogpt2.row_settings import DEFAULT_CONFIG, NamedConfig
from kogpt2.storage import local_path
from kogpt2.validate import check_bool, check_choice, check_int, check_number
from pipelines.seeds import ALL_COLUMNS, FORMATS, template_fields


def output_columns() -> list[str]:
    """The columns every output row has (``schemas/generations.json``)."""
    from kogpt2.schemas import load_schema

    return [c["name"] for c in load_schema("generations")["columns"]]


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
    id_column: str | None = field(
        default=None,
        metadata=flag("column holding each row's id, copied to every output row as row_id (default: file:line)"),
    )
    keep_columns: tuple[str, ...] = field(
        default=(),
        metadata=flag("input columns copied into every output row, with their types ('*' = all)", metavar="COLS"),
    )
    prompt_template: str | None = field(
        default=None,
        metadata=flag("the prompt from columns, Python format fields: '{title} 리뷰: {seed}'", metavar="TEMPLATE"),
    )
    configs: str | None = field(
        default=None,
        metadata=flag(
            "a JSONL file of named sampling settings: every seed is generated under each, files under config=NAME/",
            metavar="FILE",
        ),
    )
    dedup: bool = field(
        default=False,
        metadata=flag("also write duplicates.parquet (row_id, group, first row_id) of exact duplicate continuations"),
    )
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata=DecodeSettings.flag("batch_size"))
    dtype: str = field(default="float32", metadata=DecodeSettings.flag("dtype"))
    sampler: str = field(default="host", metadata=DecodeSettings.flag("sampler"))
    attention: str = field(default="auto", metadata=DecodeSettings.flag("attention"))
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
        keep = tuple(c.strip() for item in self.keep_columns for c in item.split(",") if c.strip())
        object.__setattr__(self, "keep_columns", keep)
        if ALL_COLUMNS in keep and len(keep) > 1:
            raise ValueError(f"--keep-columns {','.join(keep)}: '*' keeps every column; give it alone")
        reserved = sorted(set(keep) & set(output_columns()))
        if reserved:
            raise ValueError(
                f"--keep-columns {', '.join(reserved)}: the output has columns of that name; rename them in the input"
            )
        if self.prompt_template is not None:
            template_fields(self.prompt_template)
        check_bool(owner, "dedup", self.dedup)

    def settings(self) -> dict[str, Any]:
        """Every setting as a flat JSON object: what ``--config FILE`` reads back to repeat the run."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "config" and not f.metadata.get("per_run")
        }
        out["seeds"] = list(self.seeds)
        out["keep_columns"] = list(self.keep_columns)
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
        grid: the named configurations every row is generated under.
        parquet_types: the Arrow types of Parquet seed files' columns.
    """

    n_positions: int
    max_seed_tokens: int
    model_fingerprint: str
    tokenizer_fingerprint: str
    seed_files: dict[str, list[int]] = field(default_factory=dict)
    started: float = 0.0
    #: the named configurations (``--configs``), or one named "default": the job's settings
    grid: tuple[NamedConfig, ...] = ()
    #: ``path -> {column: Arrow type}`` of Parquet seed files (kept columns keep their types)
    parquet_types: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def partitioned(self) -> bool:
        """Files go under ``config=NAME/`` (a ``--configs`` job)."""
        return bool(self.grid) and self.grid[0].name != DEFAULT_CONFIG


@dataclass(frozen=True)
class RowCheck:
    """Checks a row's own settings under every configuration; gives the longest prompt they all leave room for.

    Picklable: :class:`pipelines.seeds.ValidateSeeds` calls it on each row.
    """

    base: GenerationConfig
    grid: tuple[NamedConfig, ...]
    n_positions: int
    max_seed_tokens: int = 0

    def __call__(self, settings: dict[str, Any]) -> int:
        """Raises ``kogpt2.row_settings.SettingError`` naming the setting and why."""
        from kogpt2.generation import max_prompt_tokens
        from kogpt2.row_settings import SettingError, effective

        limit = self.n_positions
        for named in self.grid:
            config = effective(self.base, settings, named if named.name != DEFAULT_CONFIG else None)
            try:
                limit = min(limit, max_prompt_tokens(self.n_positions, config.max_new_tokens))
            except ValueError as exc:
                raise SettingError("max_new_tokens", str(exc).split(": ", 1)[-1]) from None
        return min(limit, self.max_seed_tokens) if self.max_seed_tokens else limit
