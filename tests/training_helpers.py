"""What the training tests share: a tiny job's config, the kogpt2 CLI in-process, an output folder's parts."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from kogpt2 import outputs
from kogpt2.cli import main
from kogpt2.training import TrainConfig


def tiny_config(shards: Path, out: Path, tok, **kwargs) -> TrainConfig:
    """A short job on the tiny preset (3 epochs, lr 1e-3) with ``tok``; ``kwargs`` override."""
    base = {"model": "tiny", "tokenizer": str(tok.path), "epochs": 3, "learning_rate": 1e-3}
    return TrainConfig(data=str(shards), output=str(out), **{**base, **kwargs})


def version(out: Path | str) -> Path:
    """The committed version folder of a training output folder (a model folder)."""
    return Path(outputs.open_committed(str(out), job="train").root)


def work(out: Path | str) -> Path:
    """The work folder of the run in progress (or stopped) in ``out``: checkpoints, logs."""
    pending = outputs.read_pending(str(out))
    assert pending is not None, f"{out} has no run in progress"
    return Path(out) / pending.work


def cli(*argv: str) -> tuple[int, str, str]:
    """``kogpt2 ARGV...`` in this process: ``(exit status, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()
