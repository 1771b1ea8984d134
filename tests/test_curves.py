"""kogpt2.curves: history.json and curves.png of a training run."""

from __future__ import annotations

import json
from pathlib import Path

from kogpt2.checkpointing import CURVES_FILE, HISTORY_FILE
from kogpt2.curves import write_history


def test_history_and_curves_are_written_without_validation_too(tmp_path: Path) -> None:
    epochs = [
        {"epoch": 1, "loss": 5.0, "accuracy": 0.1, "val_loss": 4.8, "val_accuracy": 0.12},
        {"epoch": 2, "loss": 4.0, "accuracy": 0.2, "val_loss": 4.5, "val_accuracy": 0.15},
    ]
    history = {"epochs": epochs, "best_epoch": 2}
    write_history(tmp_path, history)
    assert json.loads((tmp_path / HISTORY_FILE).read_text(encoding="utf-8")) == history
    assert (tmp_path / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_val = {"epochs": [{**e, "val_loss": None, "val_accuracy": None} for e in epochs], "best_epoch": 2}
    write_history(tmp_path / ".", no_val)  # a run without a validation split: train curves only
    assert (tmp_path / CURVES_FILE).stat().st_size > 0
