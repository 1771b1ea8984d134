"""``kogpt2 report``: build report.html for a run folder."""

from __future__ import annotations

import argparse

HELP = "build report.html for a run folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run folder (what `make demo` writes)")


def run(args: argparse.Namespace) -> int:
    from kogpt2.report import build_report

    path = build_report(args.run)
    print(f"report: {path}")
    return 0
