"""``report.html`` for a run folder: training curves, preprocessing counts, generations.

A run folder (what ``make demo`` writes) holds output folders, each read through its committed
version (:mod:`kogpt2.outputs`)::

    data/          info.json: preprocessing counts (pipelines.preprocess)
    model/         history.json: per-epoch training figures (kogpt2 train)
    generations/{before,after}/  config={greedy,top_p}/*.parquet: bulk generations (one job a phase,
                   one configuration per strategy)
    demo.json      stages and timings (optional)

The report reads only those files; every figure it shows is also written to
``report.json`` so a test (or a person) can check it against the run's own files.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from kogpt2.curves import plot_curves
from kogpt2.genstats import generation_stats

PHASES = ("before", "after")
GENERATION_SETS = ("greedy", "top_p")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _committed(folder: Path, name: str) -> dict[str, Any] | None:
    """A JSON file of an output folder's committed version (checked against its manifest), or None."""
    from kogpt2 import outputs

    try:
        done = outputs.open_committed(str(folder))
    except outputs.NotCommittedError:
        return None
    return dict(done.read_json(name)) if name in done.manifest.files else None


def read_generations(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The rows of a generation output's committed version, per configuration (``config=NAME/``; a job
    without ``--configs``: ``default``), each sorted by (seed, sample_index)."""
    import pyarrow.parquet as pq

    from kogpt2 import outputs

    done = outputs.open_committed(str(folder), job="generate")
    by_config: dict[str, list[dict[str, Any]]] = {}
    for name in done.names(suffix=".parquet"):
        if "generations-" not in name:
            continue
        config = name.split("/", 1)[0].split("=", 1)[1] if name.startswith("config=") else "default"
        by_config.setdefault(config, []).extend(pq.read_table(done.path(name)).to_pylist())
    return {c: sorted(rows, key=lambda r: (r["seed"], r["sample_index"])) for c, rows in sorted(by_config.items())}


def collect(run: str | Path) -> dict[str, Any]:
    """Gather the report's figures from a run folder.

    Returns:
        ``{"preprocess": counts | None, "training": history | None,
        "generations": {"after-greedy": {"stats": ..., "rows": [...]}, ...}, "demo": ... }``.

    Raises:
        FileNotFoundError: the run folder holds none of the expected files.
    """
    run = Path(run)
    info = _committed(run / "data", "info.json")
    history = _committed(run / "model", "history.json")
    gens: dict[str, Any] = {}
    for phase in PHASES:
        folder = run / "generations" / phase  # one job a phase, a configuration per strategy
        if not (folder / "COMPLETED").is_file():
            continue
        for strategy, rows in read_generations(folder).items():
            if strategy not in GENERATION_SETS:
                continue
            stats = generation_stats(
                [r["continuation"] for r in rows], [r["new_tokens"] for r in rows], [r["finish_reason"] for r in rows]
            )
            gens[f"{phase}-{strategy}"] = {"stats": stats.as_dict(), "rows": rows}
    if info is None and history is None and not gens:
        raise FileNotFoundError(
            f"{run} holds no run outputs (data/info.json, model/history.json, generations/*/): is it a run folder?"
        )
    return {
        "run": str(run),
        "preprocess": info,
        "training": history,
        "generations": gens,
        "demo": _read_json(run / "demo.json"),
    }


def _charts(data: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Write PNG charts into ``out``; return (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []
    hist = data["training"]
    if hist and hist.get("epochs"):
        ep = [e["epoch"] for e in hist["epochs"]]
        plot_curves(hist, out / "curves.png")  # the same chart as the training run's curves.png
        made.append(("curves.png", "Loss (masked cross-entropy) and masked next-token accuracy per epoch"))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(ep, [e["val_perplexity"] for e in hist["epochs"]], "s-", color="C1")
        ax.set(xlabel="epoch", ylabel="perplexity", yscale="log", title="Validation perplexity")
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=100)
        plt.close(fig)
        made.append(("perplexity.png", "Validation perplexity"))
    info = data["preprocess"]
    if info:
        c = info["counts"]
        labels = ["read", "kept"] + [f"filtered: {k}" for k in sorted(c["filtered"])] + ["rejected", "truncated"]
        values = [c["lines_read"], c["kept"]] + [c["filtered"][k] for k in sorted(c["filtered"])]
        values += [c["rejected"], c["truncated"]]
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(labels)))
        ax.barh(labels[::-1], values[::-1], color="C2")
        for i, v in enumerate(values[::-1]):
            ax.text(v, i, f" {v}", va="center")
        ax.set(title="Preprocessing: lines", xlabel="lines")
        fig.tight_layout()
        fig.savefig(out / "preprocess.png", dpi=100)
        plt.close(fig)
        made.append(("preprocess.png", "Preprocessing counts"))
    gens = data["generations"]
    if gens:
        metrics = ["distinct_1", "distinct_2", "repetition_rate", "eos_share", "unk_rate"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(gens)
        for i, (name, g) in enumerate(sorted(gens.items())):
            ax.bar([m + i * width for m in range(len(metrics))], [g["stats"][k] for k in metrics], width, label=name)
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], metrics)
        ax.set(title="Generation statistics", ylim=(0, 1.05))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "generation.png", dpi=100)
        plt.close(fig)
        made.append(("generation.png", "Generation statistics (continuations)"))
    return made


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def render_html(data: dict[str, Any], charts: list[tuple[str, str]], chart_dir: str) -> str:
    """The report page (self-contained HTML, charts by relative path)."""
    parts = [
        "<!doctype html><html lang='ko'><head><meta charset='utf-8'><title>kogpt2 run report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "th{background:#f3f3f3}img{max-width:100%;margin:0.5em 0}</style></head><body>",
        f"<h1>kogpt2 run report</h1><p>Run folder: <code>{html.escape(data['run'])}</code></p>",
    ]
    demo = data.get("demo")
    if demo and demo.get("stages"):
        rows = [
            [s["name"], s.get("status", ""), f"{s.get('seconds', 0):.1f}", s.get("detail", "")] for s in demo["stages"]
        ]
        parts.append("<h2>Stages</h2>" + _table(["stage", "status", "seconds", "detail"], rows))
    evaluation = (demo or {}).get("evaluation") or {}
    if evaluation:
        rows = [
            [phase, _fmt(e["loss"]), _fmt(e["perplexity"]), _fmt(e["accuracy"]), e["tokens"]]
            for phase, e in evaluation.items()
        ]
        parts.append(
            "<h2>Validation split, before vs after training</h2>"
            + _table(["model", "loss", "perplexity", "accuracy", "tokens"], rows)
        )
    hist = data["training"]
    if hist:
        first, best = hist["epochs"][0], hist["epochs"][hist["best_epoch"] - 1]
        parts.append(
            "<h2>Training</h2>"
            + _table(
                ["", "epoch", "val loss", "val perplexity", "val accuracy"],
                [
                    [
                        "first epoch",
                        first["epoch"],
                        _fmt(first["val_loss"]),
                        _fmt(first["val_perplexity"]),
                        _fmt(first["val_accuracy"]),
                    ],
                    [
                        "best (saved)",
                        best["epoch"],
                        _fmt(best["val_loss"]),
                        _fmt(best["val_perplexity"]),
                        _fmt(best["val_accuracy"]),
                    ],
                ],
            )
            + f"<p>Epochs run: {hist.get('epochs_run', len(hist['epochs']))}; stopped early: {hist.get('stopped_early')}.</p>"
        )
    info = data["preprocess"]
    if info:
        c = info["counts"]
        rows = [["lines read", c["lines_read"]], ["kept", c["kept"]]]
        rows += [[f"filtered: {k}", v] for k, v in sorted(c["filtered"].items())]
        rows += [["rejected", c["rejected"]], ["truncated", c["truncated"]]]
        rows += [[f"examples: {k}", v] for k, v in sorted(c["examples"].items())]
        rows += [["<unk> rate", _fmt(c["unk_rate"])]]
        parts.append("<h2>Preprocessing</h2>" + _table(["count", "value"], rows))
    for name, caption in charts:
        parts.append(
            f"<figure><img src='{chart_dir}/{name}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    gens = data["generations"]
    if gens:
        keys = [
            "samples",
            "distinct_1",
            "distinct_2",
            "repetition_rate",
            "mean_new_tokens",
            "mean_words",
            "eos_share",
            "unk_rate",
        ]
        parts.append(
            "<h2>Generation statistics</h2>"
            + _table(["set"] + keys, [[n] + [_fmt(g["stats"][k]) for k in keys] for n, g in sorted(gens.items())])
        )
        seeds = sorted({r["seed"] for g in gens.values() for r in g["rows"]})
        cols = [n for n in (f"{p}-{s}" for s in GENERATION_SETS for p in PHASES) if n in gens]
        rows = []
        for seed in seeds:
            row = [seed]
            for n in cols:
                first = next((r for r in gens[n]["rows"] if r["seed"] == seed), None)
                row.append(first["text"] if first else "")
            rows.append(row)
        parts.append(
            "<h2>Samples per seed word (first sample), before vs after training</h2>" + _table(["seed"] + cols, rows)
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(run: str | Path) -> Path:
    """Write ``report.html``, ``charts/*.png`` and ``report.json`` into the run folder.

    Returns:
        The path of ``report.html``.
    """
    run = Path(run)
    data = collect(run)
    charts = _charts(data, run / "charts")
    (run / "report.html").write_text(render_html(data, charts, "charts"), encoding="utf-8")
    summary = {
        "preprocess": data["preprocess"]["counts"] if data["preprocess"] else None,
        "training": {k: v for k, v in (data["training"] or {}).items() if k != "config"} or None,
        "generations": {n: g["stats"] for n, g in data["generations"].items()},
        "evaluation": (data["demo"] or {}).get("evaluation"),
        "charts": [c[0] for c in charts],
    }
    (run / "report.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    return run / "report.html"
