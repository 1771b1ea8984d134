"""A training job's settings (:class:`TrainConfig`) and what it returns (:class:`TrainResult`).

Every field of :class:`TrainConfig` carries its default, its ``kogpt2 train`` flag
(:func:`kogpt2.flags.flag`) and its validation: the setting is defined once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kogpt2 import outputs
from kogpt2.distribute import DISTRIBUTION_STRATEGIES
from kogpt2.flags import flag
from kogpt2.outputs import DEFAULT_KEEP_VERSIONS, DEFAULT_LEASE_SECONDS
from kogpt2.precision import AUTO, PRECISIONS, normalize_precision
from kogpt2.schedules import SCHEDULES
from kogpt2.validate import check_bool, check_choice, check_int, check_number


@dataclass(frozen=True)
class TrainConfig:
    """One training job.

    Attributes:
        data: preprocessing output folder (``info.json``, shards, ``COMPLETED``).
        model: a model folder to fine-tune, or a preset (``tiny``, ``small``, ``base``) to train from scratch.
        output: folder for the model, ``history.json``, ``curves.png``, ``logs/``.
        epochs: maximum number of epochs.
        batch_size: global batch size (split across replicas).
        learning_rate: peak learning rate (Adam, as the notebook).
        warmup_steps: linear warmup steps.
        lr_schedule: after warmup, ``constant`` (default), ``linear`` (transformers' default)
            or ``cosine`` decay to 0 at the last step.
        weight_decay: decoupled weight decay (AdamW) when > 0; LayerNorm and biases excluded.
        clip_norm: clip gradients to this global norm.
        early_stopping_patience: stop after this many epochs without a better validation
            loss; ``0`` disables. The best epoch's weights are saved either way.
        seed: seeds weights of presets, dropout and the shuffle order.
        mixed_precision: ``no`` (float32), ``bf16`` (CPUs and GPUs) or ``fp16`` (GPUs, loss
            scaling); ``auto`` (the old boolean flag): fp16 on GPUs, bf16 on CPUs.
        jit_compile: compile the train step with XLA.
        steps_per_execution: train steps per ``tf.function`` call.
        strategy: ``auto`` (MirroredStrategy when several GPUs are visible), ``mirrored``
            (all visible GPUs, or all logical CPUs without GPUs) or ``default``.
        shuffle_buffer: examples in the shuffle buffer.
        tokenizer: tokenizer file for preset training (default: the one in ``data``).
        resume: continue an interrupted run in ``output`` (or start one if there is none).
        overwrite: replace a run already in ``output``.
        max_seconds: time budget; training stops after the first epoch that ends past it.
        save_steps: also checkpoint every this many batches within an epoch (0: epoch ends only).
        eval_steps: also score the validation split every this many batches (0: epoch ends only).
    """

    data: tuple[str, ...] = field(
        metadata=flag(
            "preprocessing outputs: one folder, several, or a glob of them (daily spans) with the same tokenizer "
            "and example format",
            metavar="DIR",
            required=True,
        )
    )
    model: str = field(
        metadata=flag(
            "model folder to fine-tune, or a preset to train from scratch: tiny, small, base", metavar="PATH_OR_PRESET"
        )
    )
    output: str = field(metadata=flag("output model folder (+ history.json, curves.png, logs/)", metavar="DIR"))
    epochs: int = field(default=10, metadata=flag("maximum epochs", metavar="N"))
    batch_size: int = field(default=16, metadata=flag("global batch size", metavar="N"))
    learning_rate: float = field(
        default=1e-4, metadata=flag("peak learning rate, Adam", metavar="LR", aliases=("--lr",))
    )
    warmup_steps: int = field(default=0, metadata=flag("linear warmup steps", metavar="N"))
    lr_schedule: str = field(
        default="constant",
        metadata=flag(
            "after warmup: constant, linear decay to 0 (transformers' default) or cosine decay to 0", choices=SCHEDULES
        ),
    )
    weight_decay: float = field(default=0.0, metadata=flag("AdamW decoupled weight decay (0: Adam)", metavar="W"))
    clip_norm: float | None = field(default=None, metadata=flag("clip gradients to this global norm", metavar="C"))
    early_stopping_patience: int = field(
        default=2,
        metadata=flag(
            "stop after N epochs without a better validation loss; 0 = off. The best epoch is saved", metavar="N"
        ),
    )
    seed: int = field(default=0, metadata=flag("seed of preset weights, dropout and shuffling", metavar="S"))
    mixed_precision: str = field(
        default="no",
        metadata=flag(
            "compute dtype: no = float32 (on CPU bf16 is emulated on most chips), bf16 (CPUs, GPUs), fp16 with loss "
            "scaling (GPUs only); the bare flag, as in earlier releases, is fp16 on GPUs, bf16 on CPUs",
            choices=(*PRECISIONS, AUTO),
            metavar="{no,bf16,fp16}",
            nargs="?",
            const=AUTO,
        ),
    )
    jit_compile: bool = field(default=False, metadata=flag("compile the train step with XLA", aliases=("--xla",)))
    steps_per_execution: int = field(default=1, metadata=flag("train steps per tf.function call", metavar="N"))
    strategy: str = field(
        default="auto",
        metadata=flag(
            "tf.distribute strategy; multi_worker: MultiWorkerMirroredStrategy over the cluster in TF_CONFIG "
            "(run the same command on every worker; the chief writes --output)",
            choices=DISTRIBUTION_STRATEGIES,
        ),
    )
    shuffle_buffer: int = field(default=10_000, metadata=flag("examples in the shuffle buffer", metavar="N"))
    tokenizer: str | None = field(
        default=None, metadata=flag("tokenizer of the shards, for preset training", metavar="PATH")
    )
    resume: bool = field(
        default=False, metadata=flag("continue an interrupted or time-stopped run in --output", per_run=True)
    )
    overwrite: bool = field(
        default=False,
        metadata=flag(
            "start a new run even if --output holds another one (its version stays readable until this one commits)",
            per_run=True,
        ),
    )
    max_seconds: float | None = field(
        default=None,
        metadata=flag(
            "time budget: stop at the first checkpoint (epoch end, or --save-steps) past it; --resume continues",
            metavar="S",
        ),
    )
    keep_versions: int = field(
        default=DEFAULT_KEEP_VERSIONS,
        metadata=flag("committed model versions kept after a commit, the new one included", metavar="N"),
    )
    lease_seconds: float = field(
        default=DEFAULT_LEASE_SECONDS, metadata=flag("the output lock's lease", metavar="S", hidden=True)
    )
    save_steps: int = field(
        default=0,
        metadata=flag("also checkpoint every N batches within an epoch, so --resume continues mid-epoch", metavar="N"),
    )
    eval_steps: int = field(
        default=0,
        metadata=flag("also score the validation split every N batches (history.json 'evaluations')", metavar="N"),
    )

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        data = (self.data,) if isinstance(self.data, str) else tuple(self.data)
        object.__setattr__(self, "data", tuple(outputs.local_path(str(d)) for d in data))
        if not self.data or not all(self.data):
            raise ValueError(f"{owner}.data={self.data!r}: required (one or more shard folders)")
        object.__setattr__(
            self, "output", outputs.local_path(self.output) if isinstance(self.output, str) else self.output
        )
        for name in ("model", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r}: required (a path)")
        for name in ("epochs", "batch_size", "steps_per_execution", "shuffle_buffer"):
            check_int(owner, name, getattr(self, name), low=1)
        for name in ("warmup_steps", "early_stopping_patience", "seed", "save_steps", "eval_steps"):
            check_int(owner, name, getattr(self, name), low=0)
        check_int(owner, "keep_versions", self.keep_versions, low=1, note="the new version included")
        check_number(owner, "lease_seconds", self.lease_seconds, gt=0)
        check_number(owner, "learning_rate", self.learning_rate, gt=0, lt=1)
        check_number(owner, "weight_decay", self.weight_decay, ge=0, lt=1)
        if self.clip_norm is not None:
            check_number(owner, "clip_norm", self.clip_norm, gt=0, note="or None for no clipping")
        if self.max_seconds is not None:
            check_number(owner, "max_seconds", self.max_seconds, gt=0, note="or None")
        check_choice(owner, "strategy", self.strategy, DISTRIBUTION_STRATEGIES)
        check_choice(owner, "lr_schedule", self.lr_schedule, SCHEDULES)
        for name in ("jit_compile", "resume", "overwrite"):
            check_bool(owner, name, getattr(self, name))
        try:  # the old boolean is accepted: True -> auto, False -> no
            object.__setattr__(self, "mixed_precision", normalize_precision(self.mixed_precision))
        except ValueError:
            raise ValueError(
                f"TrainConfig.mixed_precision={self.mixed_precision!r}: must be one of {(*PRECISIONS, AUTO)}"
            ) from None
        for name in ("save_steps", "eval_steps"):
            value = getattr(self, name)
            if value and value % self.steps_per_execution:
                raise ValueError(
                    f"TrainConfig.{name}={value}: must be a multiple of steps_per_execution={self.steps_per_execution}"
                )
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig.resume and TrainConfig.overwrite: choose one")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = list(self.data)
        return out


@dataclass(frozen=True)
class TrainResult:
    """What :func:`kogpt2.training.run_config` produced.

    Attributes:
        output: the output folder (a model folder: ``load_model(output)`` works): a ``Path``,
            or the URL string of a remote folder.
        history: the ``history.json`` document.
    """

    output: Path | str
    history: dict[str, Any]

    @property
    def best_epoch(self) -> int:
        return int(self.history["best_epoch"])

    @property
    def best_val_loss(self) -> float | None:
        return self.history["best_val_loss"]

    @property
    def best_val_perplexity(self) -> float | None:
        return self.history["best_val_perplexity"]

    def summary(self) -> str:
        """One line: best epoch, validation loss and perplexity, output folder."""
        h = self.history
        how = " (stopped early)" if h["stopped_early"] else " (time budget)" if h.get("stopped_by_time") else ""
        if not h["epochs"]:
            part = h.get("partial_epoch") or {}
            return (
                f"stopped by the time budget {part.get('epoch_steps', 0)} batches into epoch 1 (no epoch finished "
                f"yet; --resume continues): {h['steps']} steps -> {self.output}"
            )
        if h["best_val_loss"] is None:
            val = f"train loss {h['epochs'][-1]['loss']:.4f} (no validation split)"
        else:
            val = f"val loss {h['best_val_loss']:.4f}, perplexity {h['best_val_perplexity']:.2f}"
        return (
            f"best epoch {h['best_epoch']}/{h['epochs_run']}{how}: {val}, "
            f"{h['steps']} steps, {h['train_tokens']} train tokens -> {self.output}"
        )
