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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kogpt2.tf_setup import import_tf

log = logging.getLogger(__name__)

BACKUP_DIR = "backup"
STATE_FILE = "state.json"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
LOGS_DIR = "logs"
#: Files a finished run writes into ``--output`` (removed by ``overwrite``).
OUTPUT_FILES = ("config.json", "generation_config.json", "tf_model.h5", "tokenizer.spiece", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json",
                "kogpt2.json", HISTORY_FILE, CURVES_FILE)  # fmt: skip
#: Published last, in this order: a folder without ``history.json`` is not a finished run, and one
#: without ``config.json`` does not load, so a copy cut short never looks complete.
PUBLISH_LAST = ("config.json", "kogpt2.json", HISTORY_FILE)
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
    def load(cls, path: str) -> RunState:
        data = json.loads(read_text(path))
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def save(self, path: str) -> None:
        write_text(path, json.dumps(asdict(self), ensure_ascii=False, indent=2))

    @property
    def finished(self) -> bool:
        return self.stopped_early or self.stopped_by_time or len(self.epochs) >= int(self.config["epochs"])


def config_changes(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """``key: old -> new`` for settings a resumed run may not change.

    A setting missing from ``old`` (a run started by an earlier release) counts as its value
    in ``defaults``; the old boolean ``mixed_precision`` counts as ``auto``/``no``.
    """
    old = {**(defaults or {}), **old}
    if isinstance(old.get("mixed_precision"), bool):
        old["mixed_precision"] = "auto" if old["mixed_precision"] else "no"
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in RESUMABLE_CHANGES and old.get(k) != v]


def join(folder: str, *names: str) -> str:
    """``folder/name/...`` for local paths and URLs (``gs://``, ``ram://``) alike."""
    return "/".join([str(folder).rstrip("/"), *names])


def read_text(path: str) -> str:
    with import_tf().io.gfile.GFile(path, "r") as f:
        return str(f.read())


def write_text(path: str, text: str) -> None:
    """Write through a temporary name and rename: a kill leaves the old file or the new one."""
    gfile = import_tf().io.gfile
    tmp = f"{path}.tmp-{os.getpid()}"
    with gfile.GFile(tmp, "w") as f:
        f.write(text)
    gfile.rename(tmp, path, overwrite=True)


def _copy_file(src: str, dst: str) -> None:
    gfile = import_tf().io.gfile
    tmp = f"{dst}.tmp-{os.getpid()}"
    gfile.copy(src, tmp, overwrite=True)
    gfile.rename(tmp, dst, overwrite=True)


def publish(staging: Path, out: str, *, copy: Callable[[str, str], None] | None = None) -> list[str]:
    """Copy the files of a local ``staging`` folder into ``out`` (local or remote), each through a
    temporary name, :data:`PUBLISH_LAST` last; return the names in copy order."""
    gfile = import_tf().io.gfile
    gfile.makedirs(out)
    names = sorted(p.name for p in staging.iterdir() if p.is_file())
    order = [n for n in names if n not in PUBLISH_LAST] + [n for n in PUBLISH_LAST if n in names]
    for name in order:
        (copy or _copy_file)(str(staging / name), join(out, name))
    return order


def prepare_output(
    out: str,
    config: dict[str, Any],
    data_fingerprint: str,
    *,
    resume: bool,
    overwrite: bool,
    data: str,
    defaults: dict[str, Any] | None = None,
) -> RunState | None:
    """Check ``out`` (local or remote) against ``resume``/``overwrite``; return the run state,
    or None if the run already finished.

    Raises:
        RuntimeError: ``out`` holds another run and neither flag says what to do.
        ValueError: ``resume`` with other settings or changed shards.
    """
    gfile = import_tf().io.gfile
    backup = join(out, BACKUP_DIR)
    state_path = join(backup, STATE_FILE)
    if gfile.exists(state_path):
        state = RunState.load(state_path)
        if resume:
            changes = config_changes(state.config, config, defaults)
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
    elif gfile.exists(join(out, HISTORY_FILE)) and not overwrite:
        if resume:
            done = json.loads(read_text(join(out, HISTORY_FILE)))
            changes = config_changes(done.get("config", {}), config, defaults)
            if changes:
                raise ValueError(f"--resume: {out} holds a finished run with other settings ({'; '.join(changes)})")
            return None
        raise RuntimeError(f"{out} already holds a finished run: pass --overwrite to replace it, or another --output")
    elif not overwrite and any(gfile.exists(join(out, name)) for name in OUTPUT_FILES):
        raise RuntimeError(f"{out} already holds a model folder: pass --overwrite to replace it, or another --output")
    if overwrite:
        for name in OUTPUT_FILES:
            if gfile.exists(join(out, name)):
                gfile.remove(join(out, name))
        for name in (BACKUP_DIR, LOGS_DIR):
            if gfile.exists(join(out, name)):
                gfile.rmtree(join(out, name))
    gfile.makedirs(backup)
    state = RunState(config=config, data_fingerprint=data_fingerprint)
    state.save(state_path)
    return state
