"""Summarize any bulk-generation output folder (local or ``gs://``), streaming.

Reads the Parquet files of the folder's committed version (as its manifest lists them) a record
batch at a time (never a whole file), plus its ``info.json``. Exact over every row: counts, finish
reasons, token and log-probability figures, ``<unk>`` and U+FFFD counts. Distinct-n
and repetition rate (which need every n-gram kept) are computed over the first
``sample_rows`` rows in file order, and say so.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from kogpt2.genstats import UNK_SURFACE, distinct_n, repetition_rate

COLUMNS = ["continuation", "new_tokens", "finish_reason", "logprob_mean", "logprob_sum"]


def summarize_generations(folder: str, *, sample_rows: int = 100_000, batch_rows: int = 8192) -> dict[str, Any]:
    """Figures of one generation output folder.

    Args:
        folder: what ``python -m pipelines.generate --output`` wrote.
        sample_rows: rows used for distinct-1/2 and the repetition rate.
        batch_rows: rows read at a time.

    Returns:
        A JSON-able dict: ``rows``, ``files``, ``finish_reasons``, ``mean_new_tokens``,
        ``logprob_mean`` (mean, min, max), ``unk_rate``, ``replacement_chars`` (rows with
        U+FFFD), ``distinct_1``, ``distinct_2``, ``repetition_rate``, ``sampled_rows``,
        and ``info`` (the folder's ``info.json`` status and counts, if any).

    Raises:
        FileNotFoundError: the folder holds no ``generations-*.parquet``.
    """
    import pyarrow.parquet as pq

    from kogpt2 import outputs
    from kogpt2.storage import store_for

    try:
        done = outputs.open_committed(folder, job="generate")
    except outputs.NotCommittedError as exc:
        raise FileNotFoundError(f"{exc}: is it a pipelines.generate output?") from None
    files = [done.path(n) for n in done.names(suffix=".parquet")]
    if not files:
        raise FileNotFoundError(f"{folder} holds no Parquet file: is it a pipelines.generate output?")
    store = store_for(done.root)
    rows = tokens = unk = fffd = 0
    reasons: Counter[str] = Counter()
    lp_total, lp_min, lp_max = 0.0, float("inf"), float("-inf")
    sample: list[str] = []
    for path in files:
        with store.open_read(path) as f:
            parquet = pq.ParquetFile(f)
            columns = [c for c in COLUMNS if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                data = batch.to_pydict()
                conts = data["continuation"]
                rows += len(conts)
                tokens += sum(data["new_tokens"])
                reasons.update(data["finish_reason"])
                unk += sum(c.count(UNK_SURFACE) for c in conts)
                fffd += sum("\ufffd" in c for c in conts)
                for lp in data.get("logprob_mean", []):
                    lp_total += lp
                    lp_min, lp_max = min(lp_min, lp), max(lp_max, lp)
                if len(sample) < sample_rows:
                    sample.extend(conts[: sample_rows - len(sample)])
    info = None
    if outputs.INFO_FILE in done.manifest.files:
        doc = done.read_json(outputs.INFO_FILE)
        info = {"status": doc.get("status", "completed"), "counts": doc.get("counts"), "config": doc.get("config")}
    has_lp = lp_min != float("inf")
    return {
        "folder": folder,
        "files": len(files),
        "rows": rows,
        "finish_reasons": dict(sorted(reasons.items())),
        "mean_new_tokens": tokens / rows if rows else 0.0,
        "logprob_mean": {"mean": lp_total / rows, "min": lp_min, "max": lp_max} if has_lp and rows else None,
        "unk_rate": unk / tokens if tokens else 0.0,
        "replacement_chars": fffd,
        "distinct_1": distinct_n(sample, 1),
        "distinct_2": distinct_n(sample, 2),
        "repetition_rate": repetition_rate(sample),
        "sampled_rows": len(sample),
        "info": info,
    }


def _n(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a few lines for a terminal."""
    lines = [
        f"{s['folder']}: {s['rows']:,} rows in {s['files']} files",
        "finish reasons: " + ", ".join(f"{k} {v:,}" for k, v in s["finish_reasons"].items()),
        f"mean new tokens {s['mean_new_tokens']:.1f}; <unk> rate {s['unk_rate']:.4f}; "
        f"rows with U+FFFD {s['replacement_chars']:,}",
    ]
    if s["logprob_mean"]:
        lp = s["logprob_mean"]
        lines.append(f"mean log-prob per token: {lp['mean']:.3f} (min {lp['min']:.3f}, max {lp['max']:.3f})")
    lines.append(
        f"distinct-1 {s['distinct_1']:.3f}, distinct-2 {s['distinct_2']:.3f}, trigram repetition "
        f"{s['repetition_rate']:.3f} (over the first {s['sampled_rows']:,} rows)"
    )
    if s["info"]:
        c = s["info"]["counts"] or {}
        lines.append(
            f"job: {s['info']['status']}; seeds in {_n(c.get('seeds_in'))}, rejected {_n(c.get('rejected'))}, "
            f"failed rows {_n(c.get('failed_rows', 0))}"
        )
    return "\n".join(lines)
