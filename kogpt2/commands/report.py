"""``kogpt2 report``: build report.html for a run folder, or summarize a generation output folder."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", metavar="DIR", help="run folder (what `make demo` writes): report.html")
    what.add_argument(
        "--generations",
        metavar="DIR",
        help="a pipelines.generate output folder (local or gs://): print its figures, streaming the Parquet",
    )
    p.add_argument("--json", action="store_true", help="with --generations: print the figures as JSON")
    p.add_argument(
        "--sample-rows", type=int, default=100_000, metavar="N", help="rows for distinct-n (default 100,000)"
    )


def run(args: argparse.Namespace) -> int:
    if args.generations:
        from kogpt2.gensummary import format_summary, summarize_generations

        if args.sample_rows < 1:
            raise ValueError(f"--sample-rows={args.sample_rows}: must be >= 1")
        summary = summarize_generations(args.generations, sample_rows=args.sample_rows)
        print(json.dumps(summary, ensure_ascii=False, indent=2) if args.json else format_summary(summary))
        return 0
    from kogpt2.report import build_report

    path = build_report(args.run)
    print(f"report: {path}")
    return 0
