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

COLUMNS = ["prompt", "text", "continuation", "new_tokens", "finish_reason", "logprob_mean", "logprob_sum"]


class _Figures:
    """Running figures over the rows of one configuration."""

    def __init__(self, sample_rows: int, examples: int) -> None:
        self.rows = self.tokens = self.unk = self.fffd = 0
        self.reasons: Counter[str] = Counter()
        self.lp_total, self.lp_min, self.lp_max = 0.0, float("inf"), float("-inf")
        self.sample: list[str] = []
        self.examples: list[dict[str, str]] = []
        self.sample_rows, self.n_examples = sample_rows, examples
        self.files = 0

    def add(self, data: dict[str, list[Any]]) -> None:
        conts = data["continuation"]
        self.rows += len(conts)
        self.tokens += sum(data["new_tokens"])
        self.reasons.update(data["finish_reason"])
        self.unk += sum(c.count(UNK_SURFACE) for c in conts)
        self.fffd += sum("\ufffd" in c for c in conts)
        for lp in data.get("logprob_mean", []):
            self.lp_total += lp
            self.lp_min, self.lp_max = min(self.lp_min, lp), max(self.lp_max, lp)
        if len(self.sample) < self.sample_rows:
            self.sample.extend(conts[: self.sample_rows - len(self.sample)])
        for prompt, text in zip(data.get("prompt", data.get("seed", [])), data.get("text", []), strict=False):
            if len(self.examples) >= self.n_examples:
                break
            self.examples.append({"prompt": prompt, "text": text})

    def result(self) -> dict[str, Any]:
        has_lp = self.lp_min != float("inf")
        return {
            "files": self.files,
            "rows": self.rows,
            "finish_reasons": dict(sorted(self.reasons.items())),
            "mean_new_tokens": self.tokens / self.rows if self.rows else 0.0,
            "logprob_mean": {"mean": self.lp_total / self.rows, "min": self.lp_min, "max": self.lp_max}
            if has_lp and self.rows
            else None,
            "unk_rate": self.unk / self.tokens if self.tokens else 0.0,
            "replacement_chars": self.fffd,
            "distinct_1": distinct_n(self.sample, 1),
            "distinct_2": distinct_n(self.sample, 2),
            "repetition_rate": repetition_rate(self.sample),
            "sampled_rows": len(self.sample),
            "examples": self.examples,
        }


def summarize_generations(
    folder: str, *, sample_rows: int = 100_000, batch_rows: int = 8192, examples: int = 3
) -> dict[str, Any]:
    """Figures of one generation output folder's committed version, per configuration and overall.

    Args:
        folder: what ``python -m pipelines.generate --output`` wrote.
        sample_rows: rows used for distinct-1/2 and the repetition rate (per configuration).
        batch_rows: rows read at a time.
        examples: prompts and texts shown per configuration.

    Returns:
        A JSON-able dict: the overall figures (``rows``, ``files``, ``finish_reasons``,
        ``mean_new_tokens``, ``logprob_mean`` (mean, min, max), ``unk_rate``,
        ``replacement_chars`` (rows with U+FFFD), ``distinct_1``, ``distinct_2``,
        ``repetition_rate``, ``sampled_rows``, ``examples``), ``configs`` (the same per
        ``--configs`` name, with ``duplicate_rate``; one ``default`` without ``--configs``) and
        ``info`` (the job's status and counts).

    Raises:
        FileNotFoundError: the folder holds no committed generations.
    """
    import pyarrow.parquet as pq

    from kogpt2 import outputs
    from kogpt2.storage import store_for

    try:
        done = outputs.open_committed(folder, job="generate")
    except outputs.NotCommittedError as exc:
        raise FileNotFoundError(f"{exc}: is it a pipelines.generate output?") from None
    names = [n for n in done.names(suffix=".parquet") if "generations-" in n]
    if not names:
        raise FileNotFoundError(f"{folder} holds no Parquet file: is it a pipelines.generate output?")
    store = store_for(done.root)
    overall = _Figures(sample_rows, examples)
    per: dict[str, _Figures] = {}
    for name in names:
        config = name.split("/", 1)[0].split("=", 1)[1] if name.startswith("config=") else "default"
        figures = per.setdefault(config, _Figures(sample_rows, examples))
        figures.files += 1
        overall.files += 1
        with store.open_read(done.path(name)) as f:
            parquet = pq.ParquetFile(f)
            columns = [c for c in COLUMNS if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                data = batch.to_pydict()
                figures.add(data)
                overall.add(data)
    info = None
    by_config: dict[str, Any] = {}
    if outputs.INFO_FILE in done.manifest.files:
        doc = done.read_json(outputs.INFO_FILE)
        info = {"status": doc.get("status", "completed"), "counts": doc.get("counts"), "config": doc.get("config")}
        by_config = doc.get("by_config") or {}
    configs = {}
    for config, figures in sorted(per.items()):
        configs[config] = figures.result()
        configs[config]["duplicate_rate"] = (by_config.get(config) or {}).get("duplicate_rate")
    return {"folder": folder, **overall.result(), "configs": configs, "info": info}


def _n(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a few lines for a terminal; several configurations side by side."""
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
    configs = s.get("configs") or {}
    if len(configs) > 1:
        lines.append("")
        lines.append(
            f"{'config':<16}{'rows':>9}{'tokens':>8}{'dist-1':>8}{'dist-2':>8}{'repeat':>8}{'logprob':>9}{'dup':>8}"
        )
        for name, c in configs.items():
            lp = c["logprob_mean"]["mean"] if c["logprob_mean"] else float("nan")
            dup = c.get("duplicate_rate")
            lines.append(
                f"{name:<16}{c['rows']:>9,}{c['mean_new_tokens']:>8.1f}{c['distinct_1']:>8.3f}{c['distinct_2']:>8.3f}"
                f"{c['repetition_rate']:>8.3f}{lp:>9.3f}{(f'{dup:.3f}' if dup is not None else '?'):>8}"
            )
        for name, c in configs.items():
            for e in c["examples"]:
                lines.append(f"  [{name}] {e['text']}")
    elif configs:
        dup = next(iter(configs.values())).get("duplicate_rate")
        if dup is not None:
            lines.append(f"exact duplicate continuations: {dup:.3%} of rows")
    if s["info"]:
        c = s["info"]["counts"] or {}
        lines.append(
            f"job: {s['info']['status']}; seeds in {_n(c.get('seeds_in'))}, rejected {_n(c.get('rejected'))}, "
            f"failed rows {_n(c.get('failed_rows', 0))}"
        )
    return "\n".join(lines)
