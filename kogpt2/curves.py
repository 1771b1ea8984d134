"""``history.json`` and ``curves.png`` of a training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kogpt2.checkpointing import CURVES_FILE, HISTORY_FILE


def write_history(folder: str | Path, history: dict[str, Any]) -> None:
    """Write ``history.json`` and ``curves.png`` (loss and accuracy per epoch, train vs validation)."""
    folder = Path(folder)
    (folder / HISTORY_FILE).write_text(json.dumps(history, ensure_ascii=False, indent=2), encoding="utf-8")
    plot_curves(history, folder / CURVES_FILE)


def plot_curves(history: dict[str, Any], path: str | Path) -> None:
    """Plot train vs validation loss and accuracy per epoch, marking the best epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [e["epoch"] for e in history["epochs"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "loss", "loss (nats/token)"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [e[key] for e in history["epochs"]], "o-", label="train")
        val = [e[f"val_{key}"] for e in history["epochs"]]
        if any(v is not None for v in val):
            ax.plot(epochs, [float("nan") if v is None else v for v in val], "s-", label="validation")
        ax.axvline(history["best_epoch"], color="grey", linestyle=":", label=f"best (epoch {history['best_epoch']})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("training curves")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
