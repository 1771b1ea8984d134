"""Resume state of a training job: what survives a kill, and how ``--output`` is claimed.

``--output/backup/`` holds ``state.json`` (:class:`RunState`, replaced atomically) and the
TensorFlow checkpoints it points at (model, optimizer with its step, token counter). A
checkpoint is written at every epoch end and, with ``--save-steps N``, every N batches
within an epoch; the state then records how many batches of the epoch in progress the
checkpoint holds and the running loss/accuracy sums over them, so ``--resume`` skips exactly
those batches (the data order is a pure function of seed and epoch) and reports the epoch's
figures over all of its batches.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BACKUP_DIR = "backup"
STATE_FILE = "state.json"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
LOGS_DIR = "logs"
#: Files a finished run writes into ``--output`` (removed by ``overwrite``).
OUTPUT_FILES = ("config.json", "generation_config.json", "tf_model.h5", "tokenizer.spiece", "tokenizer.json",
                "kogpt2.json", HISTORY_FILE, CURVES_FILE)  # fmt: skip
#: Config fields that may change between a killed run and its ``resume``.
RESUMABLE_CHANGES = frozenset({"output", "resume", "overwrite", "max_seconds"})


class TrainingFailed(RuntimeError):
    """Training stopped on a non-finite loss or weights; the last good checkpoint is kept."""


@dataclass
class RunState:
    """What survives preemption.

    Attributes:
        epochs: one entry per finished epoch (as in ``history.json``).
        best_epoch, best_val_loss, wait: early-stopping state.
        checkpoint: the newest checkpoint (model, optimizer, token counter).
        best_checkpoint: the best epoch's weights.
        step: optimizer steps in ``checkpoint``.
        epoch_steps: batches of the epoch in progress (epoch ``len(epochs) + 1``) in ``checkpoint``.
        partial: ``{metric: [total, count]}`` over those batches.
        partial_seconds: training seconds spent on those batches.
        evaluations: ``--eval-steps`` results, ``{epoch, epoch_step, step, val_loss, ...}``.
        failure: why training stopped without finishing (non-finite loss), else None.
    """

    config: dict[str, Any]
    data_fingerprint: str
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float | None = None
    wait: int = 0
    stopped_early: bool = False
    stopped_by_time: bool = False
    checkpoint: str | None = None
    best_checkpoint: str | None = None
    starts: int = 0
    step: int = 0
    epoch_steps: int = 0
    partial: dict[str, list[float]] = field(default_factory=dict)
    partial_seconds: float = 0.0
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None

    @classmethod
    def load(cls, path: Path) -> RunState:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a kill leaves the old state or the new one

    @property
    def finished(self) -> bool:
        return self.stopped_early or self.stopped_by_time or len(self.epochs) >= int(self.config["epochs"])


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for settings a resumed run may not change."""
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in RESUMABLE_CHANGES and old.get(k) != v]


def prepare_output(
    out: Path, config: dict[str, Any], data_fingerprint: str, *, resume: bool, overwrite: bool, data: str
) -> RunState | None:
    """Check ``out`` against ``resume``/``overwrite``; return the run state, or None if the run already finished.

    Raises:
        RuntimeError: ``out`` holds another run and neither flag says what to do.
        ValueError: ``resume`` with other settings or changed shards.
    """
    backup = out / BACKUP_DIR
    state_path = backup / STATE_FILE
    if state_path.is_file():
        state = RunState.load(state_path)
        if resume:
            changes = config_changes(state.config, config)
            if changes:
                raise ValueError(f"--resume: {out} holds a run with other settings ({'; '.join(changes)})")
            if state.data_fingerprint != data_fingerprint:
                raise ValueError(f"--resume: the shards in {data} changed since the run in {out} started")
            if state.failure:
                log.warning("resuming a run that stopped with: %s", state.failure)
                state.failure = None
            return state
        if not overwrite:
            where = f", {state.epoch_steps} batches into epoch {len(state.epochs) + 1}" if state.epoch_steps else ""
            why = f" (it stopped with: {state.failure})" if state.failure else ""
            raise RuntimeError(
                f"{out} holds an interrupted run ({len(state.epochs)} of {state.config['epochs']} epochs "
                f"checkpointed{where}){why}: pass --resume to continue it, or --overwrite to start again"
            )
    elif (out / HISTORY_FILE).is_file() and not overwrite:
        if resume:
            done = json.loads((out / HISTORY_FILE).read_text(encoding="utf-8"))
            changes = config_changes(done.get("config", {}), config)
            if changes:
                raise ValueError(f"--resume: {out} holds a finished run with other settings ({'; '.join(changes)})")
            return None
        raise RuntimeError(f"{out} already holds a finished run: pass --overwrite to replace it, or another --output")
    elif not overwrite and any((out / name).exists() for name in OUTPUT_FILES):
        raise RuntimeError(f"{out} already holds a model folder: pass --overwrite to replace it, or another --output")
    if overwrite:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        for name in (BACKUP_DIR, LOGS_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    backup.mkdir(parents=True, exist_ok=True)
    state = RunState(config=config, data_fingerprint=data_fingerprint)
    state.save(state_path)
    return state
