"""Resume state of a training job: what survives a kill.

A run's work folder (``--output/w-.../``, see :mod:`kogpt2.outputs`) holds ``backup/`` with
``state.json`` (:class:`RunState`, replaced atomically) and the TensorFlow checkpoints it points at (model, optimizer with its step, token counter). A
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

from kogpt2.jobs import DivergedError
from kogpt2.storage import join
from kogpt2.tf_setup import import_tf

log = logging.getLogger(__name__)

BACKUP_DIR = "backup"
STATE_FILE = "state.json"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
LOGS_DIR = "logs"
#: Copied last, in this order (the manifest written after them is what commits the version).
PUBLISH_LAST = ("config.json", "kogpt2.json", HISTORY_FILE)


class TrainingFailed(DivergedError):
    """Training stopped on a non-finite loss or weights; the last good checkpoint is kept (exit status 4)."""


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


def read_text(path: str) -> str:
    with import_tf().io.gfile.GFile(path, "r") as f:
        return str(f.read())


def write_text(path: str, text: str) -> None:
    """Write through a temporary name and rename: a kill leaves the old file or the new one.

    Local files are fsynced before the rename (:mod:`kogpt2.storage`); remote ones go through
    ``tf.io.gfile`` (one object write on Cloud Storage).
    """
    from kogpt2.storage import scheme, store_for

    if not scheme(path):
        store_for(path).write(path, text.encode("utf-8"))
        return
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
    """Copy the files of a local ``staging`` folder into the version folder ``out`` (local or remote),
    each through a temporary name, :data:`PUBLISH_LAST` last; return the names in copy order."""
    gfile = import_tf().io.gfile
    gfile.makedirs(out)
    names = sorted(p.name for p in staging.iterdir() if p.is_file())
    order = [n for n in names if n not in PUBLISH_LAST] + [n for n in PUBLISH_LAST if n in names]
    for name in order:
        (copy or _copy_file)(str(staging / name), join(out, name))
    return order
